"""The newsletter's work products, as the agents make them and the next step reads them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.agents import StepResult
from aios_dagster.quarantine import QuarantinedInput
from aios_dagster.sources.items import SourceItem


class DroppedItem(BaseModel):
    """A source item research left out, and why."""

    item_id: str
    title: str
    url: str | None
    reason: str


class ResearchDigest(BaseModel):
    """What research found for one issue: usable items, and what it held back."""

    partition_key: str
    items: list[SourceItem]
    dropped: list[DroppedItem] = Field(default_factory=list)
    quarantined: list[QuarantinedInput] = Field(default_factory=list)
    feeds_read: int = 0
    notes_read: int = 0

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


class DrafterInput(BaseModel):
    """What the drafter sees."""

    newsletter_title: str
    issue_date: str
    audience: str
    interests: list[str]
    outline: Outline
    items: list[SourceItem]


class OutlineStep(StepResult[Outline]):
    """The outline asset: the plan, labelled with the tier that made it."""


class DraftStep(StepResult[Draft]):
    """The draft asset: the written issue, labelled with the tier that made it."""

    markdown: str = ""
    word_count: int = 0
    cost_so_far_usd: float = 0.0


class ApprovalTicket(BaseModel):
    """The approval request asset: what the operator must decide, and where to read it."""

    approval_id: str
    payload_hash: str
    status: str
    markdown_path: str
    html_path: str
    approve_command: str
