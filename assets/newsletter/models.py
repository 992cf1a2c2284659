"""The newsletter's work products, as the agents make them and the next step reads them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.agents import StepResult
from aios_dagster.quarantine import QuarantinedInput
from aios_dagster.sources.items import SourceItem


class PastStory(BaseModel):
    """A story of an earlier published issue, as semantic memory recalled it."""

    source_id: str
    headline: str
    issue: str
    url: str | None
    similarity: float
    """Cosine similarity between the candidate and this story (exact, from the index)."""


class DroppedItem(BaseModel):
    """A source item research left out, and why."""

    item_id: str
    title: str
    url: str | None
    reason: str
    covered_by: PastStory | None = None
    """For a semantic drop: the past story it repeats, with the similarity that decided it."""


class ResearchDigest(BaseModel):
    """What research found for one issue: usable items, and what it held back."""

    partition_key: str
    items: list[SourceItem]
    dropped: list[DroppedItem] = Field(default_factory=list)
    quarantined: list[QuarantinedInput] = Field(default_factory=list)
    feeds_read: int = 0
    notes_read: int = 0
    run_id: str | None = None
    """The research run that found these items (their provenance in semantic memory)."""
    memory_note: str = ""
    """Why semantic dedupe did not run, when it did not (no past issues, memory unavailable)."""

    def by_id(self) -> dict[str, SourceItem]:
        """Items keyed by id."""
        return {item.item_id: item for item in self.items}


class OutlineSection(BaseModel):
    """One section of the planned issue and the source items it covers."""

    model_config = ConfigDict(extra="forbid")

    heading: str = Field(description="Section heading, e.g. 'Top stories'.")
    angle: str = Field(description="One sentence: why these items matter to the audience.")
    item_ids: list[str] = Field(description="ids of source items, from the list given, in order.")


class Outline(BaseModel):
    """The planner's plan for one issue."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(description="The issue's headline, under 90 characters.")
    intro_angle: str = Field(description="What ties this issue together, in one sentence.")
    sections: list[OutlineSection]


class Story(BaseModel):
    """One written-up source item."""

    model_config = ConfigDict(extra="forbid")

    headline: str
    body: str = Field(description="Two to four sentences in the newsletter's voice. No links.")
    source_url: str = Field(description="The URL of the source item this story is about.")


class DraftSection(BaseModel):
    """A section of the written issue."""

    model_config = ConfigDict(extra="forbid")

    heading: str
    stories: list[Story]


class Draft(BaseModel):
    """The drafter's issue, before rendering."""

    model_config = ConfigDict(extra="forbid")

    title: str
    intro: str = Field(description="Two or three sentences opening the issue.")
    sections: list[DraftSection]
    closing: str = Field(description="One or two sentences closing the issue.")


class EngagedStory(BaseModel):
    """How readers (and the operator) responded to one past story."""

    key: str
    """What the feedback names: a normalized URL, or `title:<headline>` when it has no URL."""
    issue: str | None = None
    url: str | None = None
    headline: str | None = None
    opens: int = 0
    clicks: int = 0
    replies: int = 0
    measured_rows: int = 0
    """Export rows with opens, clicks or replies for this story (0: rated only)."""
    rating: float | None = None
    """The operator's rating, 1 to 5 (the mean when rated more than once)."""
    engagement: float = 0.0
    """-1 (readers ignored it) .. +1 (readers loved it); see `feedback.engagement_scores`."""


class FeedbackBoost(BaseModel):
    """The audience-feedback adjustment of one candidate's rank, and the stories behind it."""

    item_id: str
    title: str
    boost: float
    similar_stories: list[PastStory] = Field(default_factory=list)
    engagements: list[float] = Field(default_factory=list)
    """Engagement of each story in `similar_stories`, in the same order."""


class PlannerInput(BaseModel):
    """What the planner sees."""

    newsletter_title: str
    issue_date: str
    audience: str
    interests: list[str]
    max_items: int
    items: list[SourceItem]
    recent_topics: list[str]
    recent_urls: list[str]
    feedback_boosts: dict[str, float] = Field(default_factory=dict)
    """item_id -> relevance points from audience feedback (the rules planner adds them)."""
    reader_engagement: list[EngagedStory] = Field(default_factory=list)
    """Past stories with feedback, most engaging first (shown to the model planner)."""


class CitedFact(BaseModel):
    """A business fact from the facts tier that the issue may state, with its provenance."""

    key: str
    category: str
    value: str
    """The value as text (strings as written, other JSON values compact)."""
    as_of: str
    """The date the value took effect (its last change), YYYY-MM-DD."""
    similarity: float


class DrafterInput(BaseModel):
    """What the drafter sees."""

    newsletter_title: str
    issue_date: str
    audience: str
    interests: list[str]
    outline: Outline
    items: list[SourceItem]
    facts: list[CitedFact] = Field(default_factory=list)
    """Facts memory trusted for this issue (the retrieval policy passed them)."""


class OutlineStep(StepResult[Outline]):
    """The outline asset: the plan, labelled with the tier that made it."""

    feedback: list[FeedbackBoost] = Field(default_factory=list)
    """How audience feedback moved each candidate (empty without feedback or past issues)."""


class DraftStep(StepResult[Draft]):
    """The draft asset: the written issue, labelled with the tier that made it."""

    markdown: str = ""
    word_count: int = 0
    cost_so_far_usd: float = 0.0
    cited_facts: list[CitedFact] = Field(default_factory=list)
    """Facts from the facts tier stated in the issue (only ones the retrieval policy trusted)."""
    questions: list[str] = Field(default_factory=list)
    """What the drafter asks the operator instead of guessing (memory had no reliable answer)."""

    @property
    def needs_operator_attention(self) -> bool:
        """True when the drafter asked something the operator should answer before approving."""
        return bool(self.questions)


class ApprovalTicket(BaseModel):
    """The approval request asset: what the operator must decide, and where to read it."""

    approval_id: str
    payload_hash: str
    status: str
    markdown_path: str
    html_path: str
    approve_command: str
