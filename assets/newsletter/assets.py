"""The weekly newsletter as an asset graph: one partition per issue.

sources (researcher) -> outline (planner) -> draft (drafter) -> editorial QA (blocking check)
-> approval_request (staged, hashed, waiting for the operator) -> published_issue (publisher,
only with an approval for that exact hash).

Memory (see `memory` and `memory_assets`): research drops items an earlier issue already told
(semantic recall), the planner ranks with audience feedback, the drafter cites business facts
only when the retrieval policy trusts them and otherwise asks the operator; the working set
keeps the current draft, the planner's decisions and the drafter's open questions. The memory
assets (group `memory`) ingest this week's sources and the audience feedback in the issue job,
and each published issue's stories in the publish job.
"""

import warnings
from typing import Any, Literal

import dagster as dg

from aios_dagster.agents import AgentRole, BudgetPaused, StepResult
from aios_dagster.approvals import APPROVAL_TAG, ApprovalCost, NotAuthorized, StagedPayload
from aios_dagster.audit import StepContext
from aios_dagster.config import AiosConfig, ConfigError
from aios_dagster.connectors.base import EffectRequest
from aios_dagster.connectors.intent_log import (
    EFFECT_NOT_DONE,
)
from aios_dagster.kernel import Kernel
from aios_dagster.memory.embeddings import EmbeddingError
from aios_dagster.memory.recall import RetrievalPolicy
from aios_dagster.memory.working_set import EntryTooLarge
from aios_dagster.sources.items import SourceItem
from assets.newsletter.editorial_qa import review_issue
from assets.newsletter.feedback import AudienceFeedback, load_feedback
from assets.newsletter.memory import (
    FactRecall,
    feedback_boosts,
    has_past_stories,
    recall_facts,
)
from assets.newsletter.models import (
    ApprovalTicket,
    DrafterInput,
    DraftStep,
    FeedbackBoost,
    OutlineStep,
    PlannerInput,
    ResearchDigest,
)
from assets.newsletter.publishing import publish_issue
from assets.newsletter.render import issue_markdown, markdown_to_safe_html, word_count
from assets.newsletter.research import gather_sources
from assets.newsletter.roles import DRAFTER, PLANNER
from resources.kernel import AiosKernel
from resources.mailer import MailerResource
from resources.site import SitePublisherResource

WORKFLOW = "newsletter"
GROUP = "newsletter"
OWNERS = ["team:editorial"]
PUBLISH_JOB = "publish_newsletter_issue"
LLM_POOL = "llm"
"""Dagster concurrency pool of every step that calls a model: its limit (instance config,
`concurrency: pools: default_limit` or `dagster instance concurrency set llm N`) caps model calls
across all concurrent runs."""
ISSUE_JOB = "newsletter_issue"
PUBLISH_MODEL_COST_USD = 0.0
"""What the work after the approval gate spends on models: the publish job calls none."""
STEP_RETRIES = dg.RetryPolicy(
    max_retries=2, delay=1.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
"""Dagster retries a step only for what nothing below it retries: an unexpected error (a locked
file, a full disk). Model requests are retried inside the gateway and connector effects inside the
intent log; their final failures end on the rules tier or as a `dg.Failure(allow_retries=False)`,
so a request is never retried by two layers."""

# A check on a partitioned asset must be partitioned too, or it loads every partition; Dagster
# marks `partitions_def` on checks as preview. We rely on it knowingly: silence only that notice.
warnings.filterwarnings(
    "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning
)

ISSUE_WEEKS = dg.WeeklyPartitionsDefinition(start_date="2026-01-05", day_offset=1, end_offset=1)
"""One partition per weekly issue, keyed by the Monday that starts its week (current included)."""

SOURCES = dg.AssetKey(["newsletter", "sources"])
OUTLINE = dg.AssetKey(["newsletter", "outline"])
DRAFT = dg.AssetKey(["newsletter", "draft"])
APPROVAL_REQUEST = dg.AssetKey(["newsletter", "approval_request"])
PUBLISHED_ISSUE = dg.AssetKey(["newsletter", "published_issue"])
MEMORY_SOURCES = dg.AssetKey(["memory", "newsletter_sources"])
MEMORY_FEEDBACK = dg.AssetKey(["memory", "newsletter_feedback"])
MEMORY_PUBLISHED = dg.AssetKey(["memory", "newsletter_published"])
MAX_DRAFT_CHARS_REMEMBERED = 40_000
"""The working set keeps summaries: a longer draft is remembered clipped (the full text is
the draft asset and the staged payload)."""


def _step(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, key: dg.AssetKey
) -> StepContext:
    return StepContext(
        workflow=WORKFLOW,
        step=key.to_user_string(),
        partition_key=context.partition_key,
        run_id=context.run.run_id,
    )


def _step_metadata(step: OutlineStep | DraftStep, preview: str) -> dict[str, Any]:
    """What the agent step cost and how sure it was, as numbers the UI plots over partitions
    (a confidence of -1 means no draft was judged: the rules tier made the output)."""
    return {
        "tier": step.tier,
        "model": step.model,
        "prompt_tokens": step.prompt_tokens,
        "completion_tokens": step.completion_tokens,
        "total_tokens": step.prompt_tokens + step.completion_tokens,
        "model_calls": step.model_calls,
        "cost_usd": dg.MetadataValue.float(step.cost_usd),
        "latency_ms": dg.MetadataValue.float(round(step.latency_ms, 2)),
        "confidence": dg.MetadataValue.float(
            round(step.confidence, 4) if step.confidence is not None else -1.0
        ),
        "verified": step.verified,
        "fell_back_to_rules": step.fell_back,
        "preview": dg.MetadataValue.md(preview),
    }


def _run_role(
    kernel: Kernel,
    role: AgentRole[Any, Any],
    inputs: Any,
    step: StepContext,
    *,
    retrieval_similarity: float | None = None,
) -> StepResult[Any]:
    """Run a role under the policy engine; a budget pause stops the step without a retry."""
    try:
        return kernel.agents.run(role, inputs, step, retrieval_similarity=retrieval_similarity)
    except BudgetPaused as exc:
        raise dg.Failure(str(exc), metadata={"paused_by": "budget"}, allow_retries=False) from exc
    finally:
        kernel.audit.flush()


def _recent(aios: AiosKernel, partition_key: str) -> tuple[list[str], list[str]]:
    config = aios.operator_config()
    recent = aios.kernel().published.recent(
        WORKFLOW, limit=config.newsletter.no_repeat_issues, before=partition_key
    )
    topics = [t for issue in recent for t in issue.topics]
    urls = [u for issue in recent for u in issue.source_urls]
    return topics, urls


@dg.asset(
    key=SOURCES,
    retry_policy=STEP_RETRIES,
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "rss"},
    description="Research: this week's candidate items from the operator's feeds and notes. "
    "Bad input is quarantined with its reason; items covered by past issues (the same URL, or "
    "the same news retold, recalled from semantic memory) are dropped with the reason.",
)
def sources(context: dg.AssetExecutionContext, aios: AiosKernel) -> dg.Output[ResearchDigest]:
    """The researcher's digest for one issue."""
    kernel = aios.kernel()
    digest = gather_sources(aios.operator_config(), kernel, _step(context, SOURCES))
    kernel.audit.flush()
    preview = "\n".join(f"- {i.title} ({i.kind})" for i in digest.items[:20]) or "_no items_"
    return dg.Output(
        digest,
        metadata={
            "items": len(digest.items),
            "quarantined": len(digest.quarantined),
            "dropped": len(digest.dropped),
            "feeds_read": digest.feeds_read,
            "notes_read": digest.notes_read,
            "quarantine_reasons": dg.MetadataValue.md(
                "\n".join(f"- `{q.source[:80]}`: {q.reason}" for q in digest.quarantined)
                or "_none_"
            ),
            "dropped_as_covered": sum(1 for d in digest.dropped if d.covered_by is not None),
            "drop_reasons": dg.MetadataValue.md(
                "\n".join(f"- {d.title[:80]}: {d.reason}" for d in digest.dropped) or "_none_"
            ),
            "semantic_dedupe": digest.memory_note or "ran",
            "preview": dg.MetadataValue.md(preview),
        },
    )


@dg.asset(
    key=OUTLINE,
    retry_policy=STEP_RETRIES,
    pool=LLM_POOL,
    ins={"sources": dg.AssetIn(SOURCES)},
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "openai"},
    description="Planner: picks and orders the items that matter most to the audience, "
    "ranked with audience feedback on similar past stories, skipping topics from recent issues.",
)
def outline(
    context: dg.AssetExecutionContext, aios: AiosKernel, sources: ResearchDigest
) -> dg.Output[OutlineStep]:
    """The planner's outline for one issue."""
    config = aios.operator_config()
    kernel = aios.kernel()
    topics, urls = _recent(aios, context.partition_key)
    feedback = load_feedback(config)
    boosts, feedback_note = _feedback_boosts(
        config, kernel, _step(context, OUTLINE), sources, feedback
    )
    inputs = PlannerInput(
        newsletter_title=config.newsletter.title,
        issue_date=context.partition_key,
        audience=config.newsletter.audience.description,
        interests=config.newsletter.audience.interests,
        max_items=config.newsletter.max_items,
        items=sources.items,
        recent_topics=topics,
        recent_urls=urls,
        feedback_boosts={b.item_id: b.boost for b in boosts if b.boost},
        reader_engagement=feedback.stories,
    )
    result = _run_role(kernel, PLANNER, inputs, _step(context, OUTLINE))
    known = sources.by_id()
    plan = result.output
    unknown = [i for s in plan.sections for i in s.item_ids if i not in known]
    if unknown:
        # A model may name ids that do not exist; they are removed, and the audit says so.
        for section in plan.sections:
            section.item_ids = [i for i in section.item_ids if i in known]
        kernel.audit.note(
            _step(context, OUTLINE),
            kind="decision",
            actor="agent:planner",
            subject="outline",
            decision="removed unknown items",
            reason=f"the outline named {len(unknown)} item ids that research did not find",
            detail={"unknown_ids": unknown[:20]},
        )
    chosen = [known[i].title for s in plan.sections for i in s.item_ids if i in known]
    moved = {b.title: b.boost for b in boosts if b.boost}
    kernel.audit.note(
        _step(context, OUTLINE),
        kind="decision",
        actor="agent:planner",
        subject="outline",
        decision="planned",
        reason=f"chose {len(chosen)} of {len(sources.items)} items on the {result.tier} tier"
        + (f" ({result.note})" if result.note else "")
        + (
            f"; audience feedback moved {len(moved)} candidates"
            if moved
            else f"; no feedback boost ({feedback_note})"
        ),
        detail={"chosen": chosen, "model": result.model, "feedback_boosts": moved},
    )
    kernel.audit.flush()
    step = OutlineStep.model_validate({**result.model_dump(), "feedback": boosts})
    _remember(
        kernel,
        context,
        "decision",
        {
            "issue": context.partition_key,
            "step": "planner",
            "tier": result.tier,
            "chosen": chosen,
            "feedback_boosts": moved,
        },
        key=f"planner:{context.partition_key}",
    )
    preview = f"**{plan.title}**\n\n" + "\n".join(
        f"- {s.heading}: " + ", ".join(known[i].title for i in s.item_ids if i in known)
        for s in plan.sections
    )
    metadata = _step_metadata(step, preview)
    metadata["feedback_stories"] = len(feedback.stories)
    metadata["feedback_rows_unusable"] = len(feedback.problems)
    metadata["feedback_boosts"] = dg.MetadataValue.md(_boosts_table(boosts) or feedback_note)
    return dg.Output(step, metadata=metadata)


def _feedback_boosts(
    config: AiosConfig,
    kernel: Kernel,
    step: StepContext,
    sources: ResearchDigest,
    feedback: AudienceFeedback,
) -> tuple[list[FeedbackBoost], str]:
    """Feedback boosts for this week's candidates, or none and why."""
    if not feedback.files:
        return [], "no feedback configured (newsletter.feedback_csv, newsletter.ratings_file)"
    if not feedback.stories:
        return [], "the feedback files name no story"
    try:
        index = kernel.semantic_index()
        if not has_past_stories(index, step.partition_key or ""):
            return [], "no earlier issue in semantic memory to compare with"
        boosts = feedback_boosts(
            index,
            sources.items,
            feedback,
            step.partition_key or "",
            floor=config.memory.recall_threshold,
        )
    except (ConfigError, EmbeddingError) as exc:
        note = f"semantic memory unavailable, ranked without feedback: {exc}"
        kernel.audit.note(
            step,
            kind="decision",
            actor="agent:planner",
            subject="memory:semantic_index",
            decision="feedback not used",
            reason=note,
        )
        return [], note
    if not any(b.boost for b in boosts):
        return boosts, "no candidate resembles a past story with feedback"
    return boosts, ""


def _boosts_table(boosts: list[FeedbackBoost]) -> str:
    rows = [
        f"| {b.title[:70]} | {b.boost:+.2f} | "
        + "; ".join(
            f"{s.headline[:50]} ({s.issue}, sim {s.similarity:.2f}, engagement {e:+.2f})"
            for s, e in zip(b.similar_stories[:3], b.engagements[:3], strict=False)
        )
        + " |"
        for b in sorted(boosts, key=lambda b: -abs(b.boost))
        if b.boost
    ]
    if not rows:
        return ""
    return "| candidate | boost | like past stories |\n|---|---|---|\n" + "\n".join(rows)


def _remember(
    kernel: Kernel,
    context: dg.AssetExecutionContext,
    kind: Literal["decision", "question", "artifact"],
    content: Any,
    *,
    key: str,
) -> None:
    """Write to the workflow's working set; a summary too large for it is logged, not fatal."""
    try:
        kernel.working_set(WORKFLOW).remember(kind, content, key=key, run_id=context.run.run_id)
    except EntryTooLarge as exc:
        context.log.warning(f"working set: {exc}")


@dg.asset(
    key=DRAFT,
    retry_policy=STEP_RETRIES,
    pool=LLM_POOL,
    ins={"sources": dg.AssetIn(SOURCES), "outline": dg.AssetIn(OUTLINE)},
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "openai", "markdown"},
    description="Drafter: writes the issue from the outline, one story per item, each citing "
    "its source; states business facts only when the retrieval policy trusts them, and asks the "
    "operator otherwise. Checked by editorial QA before it can be sent for approval.",
)
def draft(
    context: dg.AssetExecutionContext,
    aios: AiosKernel,
    sources: ResearchDigest,
    outline: OutlineStep,
) -> dg.Output[DraftStep]:
    """The drafter's issue, rendered to Markdown."""
    config = aios.operator_config()
    kernel = aios.kernel()
    chosen = {i for s in outline.output.sections for i in s.item_ids}
    items: list[SourceItem] = [i for i in sources.items if i.item_id in chosen]
    facts = _recall_facts(config, kernel, _step(context, DRAFT), items)
    inputs = DrafterInput(
        newsletter_title=config.newsletter.title,
        issue_date=context.partition_key,
        audience=config.newsletter.audience.description,
        interests=config.newsletter.audience.interests,
        outline=outline.output,
        items=items,
        facts=facts.cited,
    )
    result = _run_role(
        kernel,
        DRAFTER,
        inputs,
        _step(context, DRAFT),
        retrieval_similarity=facts.recall.best_similarity if facts.cited else None,
    )
    kernel.audit.flush()
    markdown = issue_markdown(result.output, issue_date=context.partition_key, facts=facts.cited)
    step = DraftStep.model_validate(
        {
            **result.model_dump(),
            "markdown": markdown,
            "word_count": word_count(markdown),
            "cost_so_far_usd": outline.cost_usd + result.cost_usd,
            "cited_facts": facts.cited,
            "questions": [facts.question] if facts.question else [],
        }
    )
    _track_questions(kernel, context, step.questions)
    _remember(
        kernel,
        context,
        "artifact",
        {
            "issue": context.partition_key,
            "title": step.output.title,
            "tier": step.tier,
            "word_count": step.word_count,
            "markdown": markdown[:MAX_DRAFT_CHARS_REMEMBERED],
            "clipped": len(markdown) > MAX_DRAFT_CHARS_REMEMBERED,
            "cited_facts": [f.key for f in step.cited_facts],
            "questions": step.questions,
        },
        key="current_draft",
    )
    metadata = _step_metadata(step, markdown)
    metadata["word_count"] = step.word_count
    metadata["cost_so_far_usd"] = dg.MetadataValue.float(step.cost_so_far_usd)
    metadata["needs_operator_attention"] = step.needs_operator_attention
    metadata["questions"] = dg.MetadataValue.md(
        "\n".join(f"- {q}" for q in step.questions) or "_none_"
    )
    metadata["cited_facts"] = dg.MetadataValue.md(
        "\n".join(
            f"- `{f.key}`: {f.value} (as of {f.as_of}, similarity {f.similarity:.2f})"
            for f in step.cited_facts
        )
        or "_none_"
    )
    metadata["facts_best_similarity"] = dg.MetadataValue.float(
        round(facts.recall.best_similarity, 4)
    )
    return dg.Output(step, metadata=metadata)


def _track_questions(
    kernel: Kernel, context: dg.AssetExecutionContext, questions: list[str]
) -> None:
    """Keep this issue's open questions in the working set: ask each new one once, and close
    the ones a new draft no longer asks (the operator supplied the facts, the stories changed)."""
    working_set = kernel.working_set(WORKFLOW)
    key = f"draft:{context.partition_key}"
    for entry in working_set.recent("question"):
        if entry.entry_key == key and entry.content not in questions:
            working_set.resolve_question(str(entry.content))
            context.log.info(f"The drafter no longer asks: {entry.content}")
    open_questions = set(working_set.open_questions())
    for question in questions:
        context.log.warning(f"The drafter needs the operator: {question}")
        if question not in open_questions:
            _remember(kernel, context, "question", question, key=key)


def _recall_facts(
    config: AiosConfig, kernel: Kernel, step: StepContext, items: list[SourceItem]
) -> FactRecall:
    """The facts the drafter may state, or the question it asks instead (see `recall_facts`).

    When the embedder cannot run, nothing can be judged relevant: the policy then sees no
    hits, so memory is not used as fact and the operator is asked, as for a poor match.
    """
    try:
        return recall_facts(kernel, items, step, threshold=config.memory.recall_threshold)
    except (ConfigError, EmbeddingError) as exc:
        kernel.audit.note(
            step,
            kind="decision",
            actor="agent:drafter",
            subject="memory:semantic_index",
            decision="facts not recalled",
            reason=f"semantic memory unavailable: {exc}",
        )
        recall = RetrievalPolicy(config.memory.recall_threshold, kernel.audit).judge(
            "business facts for this issue", [], step, actor="agent:drafter"
        )
        return FactRecall(recall=recall, question=recall.clarifying_question())


@dg.asset_check(
    asset=DRAFT,
    name="editorial_qa",
    blocking=True,
    additional_ins={"sources": dg.AssetIn(SOURCES), "outline": dg.AssetIn(OUTLINE)},
    partitions_def=ISSUE_WEEKS,
    description="Length bounds, required sections, every link from a source the outline "
    "chose, no topic repeated from recent issues. Blocks the approval request when it fails.",
)
def editorial_qa(
    context: dg.AssetCheckExecutionContext,
    aios: AiosKernel,
    draft: DraftStep,
    sources: ResearchDigest,
    outline: OutlineStep,
) -> dg.AssetCheckResult:
    """Editorial QA on the draft."""
    config = aios.operator_config()
    topics, urls = _recent(aios, context.partition_key)
    # Links may only point at the sources this issue is about: a model fooled into citing
    # another page, or attributing a story to a different real item, is caught here.
    chosen = {item_id for section in outline.output.sections for item_id in section.item_ids}
    report = review_issue(
        draft=draft.output,
        markdown=draft.markdown,
        source_urls={i.url for i in sources.items if i.url and i.item_id in chosen},
        min_words=config.newsletter.length.min_words,
        max_words=config.newsletter.length.max_words,
        required_sections=config.newsletter.required_sections,
        recent_topics=topics,
        recent_urls=set(urls),
    )
    kernel = aios.kernel()
    kernel.audit.note(
        _step(context, DRAFT).model_copy(update={"step": "newsletter/draft:editorial_qa"}),
        kind="decision",
        actor="check:editorial_qa",
        subject="draft",
        decision="passed" if report.passed else "blocked",
        reason="; ".join(f"{f.check}: {f.detail}" for f in report.failures()) or "all passed",
    )
    kernel.audit.flush()
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            f.check: f"{'pass' if f.passed else 'FAIL'}: {f.detail}" for f in report.findings
        },
    )


@dg.asset(
    key=APPROVAL_REQUEST,
    retry_policy=STEP_RETRIES,
    ins={"sources": dg.AssetIn(SOURCES), "draft": dg.AssetIn(DRAFT)},
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "sqlite"},
    description="Approval gate: the rendered issue (Markdown and HTML) staged under its content "
    "hash, the publish intent recorded, waiting for the operator's decision.",
)
def approval_request(
    context: dg.AssetExecutionContext,
    aios: AiosKernel,
    sources: ResearchDigest,
    draft: DraftStep,
) -> dg.Output[ApprovalTicket]:
    """Stage the issue and ask the operator."""
    kernel = aios.kernel()
    config = aios.operator_config()
    html = markdown_to_safe_html(draft.markdown)
    stories = [s for section in draft.output.sections for s in section.stories]
    payload = StagedPayload(
        workflow=WORKFLOW,
        partition_key=context.partition_key,
        action="publish",
        title=draft.output.title,
        summary=draft.output.intro[:300],
        markdown=draft.markdown,
        html=html,
        metadata={
            "source_urls": sorted({s.source_url for s in stories}),
            "topics": [s.headline for s in stories],
            "stories": [
                {
                    "section": section.heading,
                    "headline": s.headline,
                    "body": s.body,
                    "source_url": s.source_url,
                }
                for section in draft.output.sections
                for s in section.stories
            ],
            "tiers": {"drafter": draft.tier, "drafter_model": draft.model},
            "cost_so_far_usd": draft.cost_so_far_usd,
            "quarantined_inputs": len(sources.quarantined),
            "cited_facts": [f.model_dump() for f in draft.cited_facts],
            "questions": draft.questions,
            "needs_operator_attention": draft.needs_operator_attention,
        },
    )
    approval = kernel.approvals.request(
        payload,
        execute_job=PUBLISH_JOB,
        run_id=context.run.run_id,
        cost=ApprovalCost(
            so_far_usd=draft.cost_so_far_usd,
            to_finish_usd=PUBLISH_MODEL_COST_USD,
            basis="publishing writes the site and sends the emails; it calls no model",
        ),
    )
    kernel.intents.plan(
        EffectRequest(
            workflow=WORKFLOW,
            item_key=context.partition_key,
            action="publish_site",
            target=config.newsletter.site_url,
            payload_hash=approval.payload_hash,
        ),
        "static_site",
        run_id=context.run.run_id,
    )
    kernel.audit.flush()
    markdown_path, html_path = kernel.approvals.readable_copies(WORKFLOW, context.partition_key)
    command = f"aios approvals approve {approval.approval_id} --publish"
    ticket = ApprovalTicket(
        approval_id=approval.approval_id,
        payload_hash=approval.payload_hash,
        status=approval.status,
        markdown_path=str(markdown_path),
        html_path=str(html_path),
        approve_command=command,
    )
    context.log.info(f"Draft staged at {markdown_path}. Approve and publish with: {command}")
    if draft.questions:
        context.log.warning(
            f"Before approving, answer the drafter's {len(draft.questions)} question(s): "
            + " | ".join(draft.questions)
        )
    return dg.Output(
        ticket,
        metadata={
            "approval_id": approval.approval_id,
            "status": approval.status,
            "payload_hash": approval.payload_hash,
            "draft_markdown": dg.MetadataValue.path(str(markdown_path)),
            "approve_command": dg.MetadataValue.md(f"`{command}`"),
            "cost_so_far_usd": dg.MetadataValue.float(draft.cost_so_far_usd),
            "cost_to_finish_usd": dg.MetadataValue.float(PUBLISH_MODEL_COST_USD),
            "needs_operator_attention": draft.needs_operator_attention,
            "questions": dg.MetadataValue.md(
                "\n".join(f"- {q}" for q in draft.questions) or "_none_"
            ),
        },
    )


@dg.asset(
    key=PUBLISHED_ISSUE,
    retry_policy=STEP_RETRIES,
    deps=[APPROVAL_REQUEST],
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "html", "email"},
    description="Publisher: writes the approved issue to the static site (page, index, Atom "
    "feed) and emails subscribers when SMTP is configured. Runs only with an approval whose "
    "hash matches the staged payload; idempotent across retries and crashes.",
)
def published_issue(
    context: dg.AssetExecutionContext,
    aios: AiosKernel,
    site: SitePublisherResource,
    mailer: MailerResource,
) -> dg.MaterializeResult[None]:
    """Publish the approved issue for this week."""
    kernel = aios.kernel()
    partition = context.partition_key
    approval_id = context.run.tags.get(APPROVAL_TAG)
    if approval_id is None:
        current = kernel.approvals.current(WORKFLOW, partition, "publish")
        if current is None or current.status != "approved":
            state = "no approval request" if current is None else f"approval {current.status}"
            raise dg.Failure(
                f"issue {partition} cannot be published: {state}. Approve it first with "
                "`aios approvals approve <id> --publish`.",
                allow_retries=False,
            )
        approval_id = current.approval_id
    try:
        approval, payload = kernel.approvals.authorize(approval_id, partition_key=partition)
    except NotAuthorized as exc:
        kernel.audit.note(
            _step(context, PUBLISHED_ISSUE),
            kind="decision",
            actor="agent:publisher",
            subject=f"approval:{approval_id}",
            decision="refused",
            reason=str(exc),
        )
        kernel.audit.flush()
        raise dg.Failure(f"not publishing issue {partition}: {exc}", allow_retries=False) from None
    already = kernel.published.get(WORKFLOW, partition)
    if already is not None and already.payload_hash != approval.payload_hash:
        kernel.audit.flush()
        raise dg.Failure(
            f"issue {partition} was already published from payload {already.payload_hash[:10]}; "
            "publishing a different payload for the same issue is a correction, not a retry",
            allow_retries=False,
        )
    try:
        report = publish_issue(
            kernel=kernel,
            approval=approval,
            payload=payload,
            site=site.publisher(),
            mailer=mailer.mailer(),
            context=_step(context, PUBLISHED_ISSUE),
        )
    except EFFECT_NOT_DONE as exc:
        # The site connector already retried what was transient (or its breaker is open):
        # a step retry would stack on that. The intent log keeps the effect's state, so
        # re-running the job later continues exactly where this stopped.
        raise dg.Failure(
            f"issue {partition} was not published: {type(exc).__name__}: {exc}",
            allow_retries=False,
        ) from exc
    finally:
        kernel.audit.flush()
    if report.email_needs_operator:
        raise dg.Failure(
            f"issue {partition} is on the site ({report.url}), but "
            f"{len(report.email_needs_operator)} emails may have gone out before a worker died;"
            " they will NOT be resent. Check the mail log for their Message-IDs, then settle"
            " them with `aios effects resolve`."
            + (
                f" {len(report.email_failed)} other emails failed; re-running the job sends"
                " only those."
                if report.email_failed
                else ""
            ),
            metadata={
                "needs_operator": dg.MetadataValue.json(report.email_needs_operator),
                "failed": dg.MetadataValue.json(report.email_failed),
            },
            allow_retries=False,
        )
    if report.email_failed:
        raise dg.Failure(
            f"issue {partition} is on the site ({report.url}) but {len(report.email_failed)} "
            "emails did not go out; re-running the job sends only those",
            metadata={"failed": dg.MetadataValue.json(report.email_failed)},
            # The mail connector already retried each transient failure; a step retry would
            # stack on it. Re-running the job sends only the emails that did not go out.
            allow_retries=False,
        )
    return dg.MaterializeResult(
        metadata={
            "url": dg.MetadataValue.url(report.url),
            "site_path": dg.MetadataValue.path(report.site_path),
            "approval_id": approval.approval_id,
            "payload_hash": approval.payload_hash,
            "site_effect": "replayed"
            if report.site.replayed
            else ("reconciled" if report.site.reconciled else "performed"),
            "emails_sent": len(report.emailed),
            "emails_replayed": len(report.email_replayed),
            "subscriber_problems": len(report.subscriber_problems),
        }
    )


newsletter_issue_job = dg.define_asset_job(
    ISSUE_JOB,
    selection=dg.AssetSelection.assets(
        SOURCES, OUTLINE, DRAFT, APPROVAL_REQUEST, MEMORY_SOURCES, MEMORY_FEEDBACK
    ),
    description="Prepare this week's issue up to the approval gate, and remember this week's "
    "sources and the latest audience feedback.",
    tags={"aios/workflow": WORKFLOW},
)

publish_newsletter_job = dg.define_asset_job(
    PUBLISH_JOB,
    selection=dg.AssetSelection.assets(PUBLISHED_ISSUE, MEMORY_PUBLISHED),
    description="Publish an approved issue (launched by the approvals sensor or the CLI), then "
    "remember its stories so later issues do not repeat them.",
    tags={"aios/workflow": WORKFLOW},
)

ASSETS: list[dg.AssetsDefinition | dg.AssetSpec] = [
    sources,
    outline,
    draft,
    approval_request,
    published_issue,
]
CHECKS = [editorial_qa]
JOBS = [newsletter_issue_job, publish_newsletter_job]
