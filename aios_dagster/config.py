"""The operator's configuration: one YAML file, validated before anything runs.

Every key has a default, so an empty file (or no file at all) is a valid configuration that runs
offline on the rules tier. A bad value stops with a message that names the key and says what is
wrong. Secrets never live here: the file names environment variables, the process reads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

CONFIG_ENV_VAR = "AIOS_CONFIG"
"""Environment variable naming the operator config file; `./aios.yaml` is read when unset."""

DEFAULT_CONFIG_FILE = "aios.yaml"

ENV_VAR_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")

EMAIL_ADDRESS = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[A-Za-z0-9-]{2,}$")


def _email_address(value: str) -> str:
    # A pattern constraint would report the regular expression; say what is expected instead.
    if not EMAIL_ADDRESS.match(value):
        raise ValueError(f"'{value}' is not an email address such as name@example.com")
    return value


EmailAddress = Annotated[str, Field(max_length=254), AfterValidator(_email_address)]
"""An address without display name: enough to catch typos; the SMTP server has the last word."""


class ConfigError(ValueError):
    """The operator config is unreadable or invalid; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_value_means_default(cls, data: Any) -> Any:
        """`key:` with nothing after it (YAML null) means the default, as if the key were
        deleted; keys whose value may be empty (base_url, notes_dir, smtp) keep their null."""
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in cls.model_fields
            or type(None) in get_args(cls.model_fields[key].annotation)
        }


class OperatorIdentity(_Section):
    """Who runs this company: used as the default approver and as the asset owner."""

    name: str = "Operator"
    email: EmailAddress = "operator@example.com"


class ModelPrice(_Section):
    """US dollars per million tokens; a model without a price cannot be called."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class ModelTier(_Section):
    """One named tier of model quality and cost (draft, verify)."""

    model: str = Field(min_length=1)
    max_output_tokens: int = Field(default=1500, ge=16, le=200_000)
    temperature: float = Field(default=0.2, ge=0, le=2)


class Endpoint(_Section):
    """An OpenAI-compatible endpoint (OpenAI, Ollama, vLLM, llama.cpp server)."""

    base_url: str | None = Field(
        default=None,
        description="Leave empty to run every role on the rules tier, offline.",
    )
    api_key_env: str = Field(
        default="AIOS_LLM_API_KEY",
        description="Name of the environment variable holding the API key.",
    )
    timeout_seconds: float = Field(default=60.0, gt=0, le=1800)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:11434/v1")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a key")
        return value


TierName = Literal["rules", "draft", "verify"]

DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(input_per_million=0.15, output_per_million=0.60),
    "gpt-4o": ModelPrice(input_per_million=2.50, output_per_million=10.00),
    "gpt-4.1-mini": ModelPrice(input_per_million=0.40, output_per_million=1.60),
    "gpt-4.1": ModelPrice(input_per_million=2.00, output_per_million=8.00),
}


def _default_tiers() -> dict[Literal["draft", "verify"], ModelTier]:
    return {
        "draft": ModelTier(model="gpt-4o-mini"),
        "verify": ModelTier(model="gpt-4o", max_output_tokens=2000),
    }


def _default_roles() -> dict[str, TierName]:
    return {"planner": "draft", "drafter": "draft"}


class LLMSettings(_Section):
    """Where models live, which model each tier uses, what each costs, which tier a role uses."""

    endpoint: Endpoint = Endpoint()
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    tiers: dict[Literal["draft", "verify"], ModelTier] = Field(default_factory=_default_tiers)
    roles: dict[str, TierName] = Field(
        default_factory=_default_roles,
        description="Tier per agent role; a role not listed runs on the draft tier.",
    )

    @field_validator("tiers")
    @classmethod
    def _every_tier_is_priced(
        cls, tiers: dict[str, ModelTier], info: ValidationInfo
    ) -> dict[str, ModelTier]:
        # `prices` is declared first, so it is validated (and in info.data) by now.
        known = {**DEFAULT_PRICES, **info.data.get("prices", {})}
        for tier_name, tier in tiers.items():
            if tier.model not in known:
                raise ValueError(
                    f"{tier_name}.model '{tier.model}' has no price: add it under llm.prices "
                    "(a model that cannot be priced is never called)"
                )
        return tiers

    def price_table(self) -> dict[str, ModelPrice]:
        """Built-in prices overlaid with the operator's own."""
        return {**DEFAULT_PRICES, **self.prices}

    def tier_for_role(self, role: str) -> TierName:
        """The tier a role runs on: its configured tier, or rules when no endpoint is set."""
        if self.endpoint.base_url is None:
            return "rules"
        return self.roles.get(role, "draft")


class Cadence(_Section):
    """When the weekly issue is prepared (the schedule); the operator approves before it ships."""

    day_of_week: Literal[
        "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"
    ] = "monday"
    hour: int = Field(default=7, ge=0, le=23)
    minute: int = Field(default=0, ge=0, le=59)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone '{value}'") from exc
        return value

    @property
    def day_number(self) -> int:
        """Cron day of week (0 = Sunday)."""
        days = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
        return days.index(self.day_of_week)


class Audience(_Section):
    """Who reads the newsletter; interests steer what research keeps and how topics rank."""

    description: str = "Solo founders and indie makers building small, profitable software."
    interests: list[str] = Field(
        default_factory=lambda: [
            "pricing",
            "indie",
            "bootstrapped",
            "saas",
            "newsletter",
            "automation",
            "ai",
            "growth",
        ]
    )


class LengthBounds(_Section):
    """Editorial QA: the issue's word count must fall between these bounds."""

    min_words: int = Field(default=120, ge=1)
    max_words: int = Field(default=2500, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthBounds:
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


class NewsletterSettings(_Section):
    """The weekly newsletter workflow: its sources, audience, shape and where it is published."""

    title: str = "The Weekly Signal"
    feeds: list[str] = Field(
        default_factory=list,
        description="RSS/Atom feeds: http(s) URLs or local file paths.",
    )
    notes_dir: Path | None = Field(
        default=None, description="A folder of Markdown notes the operator wants covered."
    )
    cadence: Cadence = Cadence()
    audience: Audience = Audience()
    max_items: int = Field(default=6, ge=1, le=50)
    length: LengthBounds = LengthBounds()
    required_sections: list[str] = Field(default_factory=lambda: ["Top stories", "Sources"])
    no_repeat_issues: int = Field(
        default=4, ge=0, le=52, description="A topic may not repeat within this many past issues."
    )
    feed_timeout_seconds: float = Field(default=20.0, gt=0, le=300)
    max_feed_bytes: int = Field(default=5_000_000, ge=1_000)
    site_dir: Path = Field(default=Path("site"), description="Relative paths sit in state_dir.")
    site_url: str = "http://localhost:8000/"
    subscribers: list[EmailAddress] = Field(default_factory=list)
    subscribers_file: Path | None = Field(
        default=None, description="A text or CSV file with one subscriber email per line."
    )
    feedback_csv: Path | None = Field(
        default=None,
        description="Audience feedback exported from the email tool (CSV: a row per story link "
        "or per issue, with columns such as issue/date, url, title, opens, clicks, replies); "
        "the planner ranks topics like the ones readers engaged with higher. Relative to the "
        "config file; bad rows are quarantined, never fatal.",
    )
    ratings_file: Path | None = Field(
        default=None,
        description="The operator's own ratings of past stories (CSV: url or title, optional "
        "issue, rating from 1 to 5); combined with feedback_csv when both are set.",
    )

    @field_validator("feeds")
    @classmethod
    def _feed_locations(cls, feeds: list[str]) -> list[str]:
        for feed in feeds:
            if not feed.strip():
                raise ValueError("a feed location is empty")
            if "://" in feed and not re.match(r"^(https?|file)://", feed):
                raise ValueError(f"'{feed}' must be an http(s) URL or a local path")
        return feeds

    @field_validator("feedback_csv", "ratings_file")
    @classmethod
    def _csv_file(cls, value: Path | None) -> Path | None:
        # A spreadsheet saved as .xlsx or a folder name is a likely slip: say so at load time
        # instead of quarantining the whole file at every run.
        if value is None:
            return None
        if not str(value).strip() or str(value) == ".":
            raise ValueError("must name a file (leave the key empty for none)")
        if value.suffix.lower() not in {".csv", ".tsv", ".txt"}:
            raise ValueError(
                f"'{value}' must be a .csv, .tsv or .txt export (comma-, "
                "semicolon- or tab-separated)"
            )
        return value

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError("must be an http(s) URL")
        return value if value.endswith("/") else value + "/"


class SmtpSettings(_Section):
    """Outgoing mail. Present only when the operator wants email delivery."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_env: str = "AIOS_SMTP_PASSWORD"
    from_address: EmailAddress = "newsletter@example.com"
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a password")
        return value


class EmbeddingSettings(_Section):
    """How text becomes vectors: the packaged MiniLM model offline, or an endpoint."""

    provider: Literal["local", "endpoint"] = Field(
        default="local",
        description="local: all-MiniLM-L6-v2 run in-process (no torch, no network); endpoint: "
        "an OpenAI-compatible /embeddings API (llm.endpoint unless base_url is set).",
    )
    model: str = Field(default="all-MiniLM-L6-v2", min_length=1)
    dimensions: int = Field(default=384, ge=8, le=8192)
    batch_size: int = Field(default=64, ge=1, le=4096)
    base_url: str | None = None
    api_key_env: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:11434/v1")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a key")
        return value


class MemorySettings(_Section):
    """The three memory tiers: working set, semantic index, structured facts."""

    embeddings: EmbeddingSettings = EmbeddingSettings()
    recall_threshold: float = Field(
        default=0.35,
        ge=-1,
        le=1,
        description="Below this cosine similarity a recall is not used as fact: the agent asks.",
    )
    covered_threshold: float = Field(
        default=0.86, ge=-1, le=1, description="Items this similar to past issues count as covered."
    )
    ann_index_min_rows: int = Field(
        default=10_000, ge=256, description="Build an ANN index once a table has this many rows."
    )
    working_set_items: int = Field(
        default=50, ge=1, le=10_000, description="Entries kept per workflow (oldest evicted)."
    )
    chunk_chars: int = Field(default=1200, ge=200, le=20_000)
    chunk_overlap_chars: int = Field(default=150, ge=0, le=5_000)
    max_document_bytes: int = Field(default=10_000_000, ge=1_000)

    @model_validator(mode="after")
    def _overlap_smaller_than_chunk(self) -> MemorySettings:
        if self.chunk_overlap_chars >= self.chunk_chars:
            raise ValueError("chunk_overlap_chars must be smaller than chunk_chars")
        return self


class BudgetSettings(_Section):
    """Dollar ceilings for model spend; a call is refused before it could pass any of them."""

    run_usd: float | None = Field(default=1.00, ge=0, description="Per Dagster run.")
    workflow_day_usd: float | None = Field(
        default=5.00, ge=0, description="Per workflow per UTC day (override per workflow below)."
    )
    workflow_day_overrides: dict[str, float] = Field(
        default_factory=dict, description="Workflow name -> its own daily ceiling in USD."
    )
    month_usd: float | None = Field(default=50.00, ge=0, description="All workflows, per month.")

    @field_validator("workflow_day_overrides")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for workflow, limit in value.items():
            if limit < 0:
                raise ValueError(f"{workflow}: a budget cannot be negative")
        return value

    def day_limit(self, workflow: str) -> float | None:
        """The daily ceiling that applies to a workflow."""
        return self.workflow_day_overrides.get(workflow, self.workflow_day_usd)


OverBudget = Literal["lower_tier", "rules", "pause"]


class RetrySettings(_Section):
    """Transient failures (429, 5xx, timeouts, resets) are retried with backoff; others not."""

    max_attempts: int = Field(default=4, ge=1, le=20)
    max_seconds: float = Field(default=90.0, gt=0, le=3600)
    initial_wait_seconds: float = Field(default=0.5, ge=0, le=60)
    max_wait_seconds: float = Field(default=20.0, ge=0, le=600)


class BreakerSettings(_Section):
    """Circuit breakers per endpoint and per connector, shared by every process."""

    failure_threshold: int = Field(default=5, ge=1, le=1000)
    cooldown_seconds: float = Field(default=60.0, ge=0, le=86_400)


class RolePolicy(_Section):
    """How one agent role spends: when its draft is good enough, and whether it is high-value."""

    confidence_threshold: float = Field(default=0.7, ge=0, le=1)
    verify: bool = Field(default=True, description="Whether the verify tier may run at all.")
    high_value: bool = Field(default=False, description="Always verify (publish, refund...).")


class ApprovalDeadline(_Section):
    """How long an action type may wait for the operator, and what happens when it has waited.

    Why: an approval that waits forever is work that silently never ships (or, worse, ships a
    stale draft weeks later). On expiry the policy applies: `reject` (with reason 'deadline
    passed'), `escalate` (email the operator once through the SMTP connector; the request stays
    pending), or `approve`, which is allowed only for action types marked `reversible`: an
    irreversible action is never taken without the operator's yes (promise 1).
    """

    hours: float = Field(gt=0, le=24 * 366, description="Hours from the request to the deadline.")
    on_expiry: Literal["reject", "escalate", "approve"] = "escalate"
    reversible: bool = Field(
        default=False, description="The action can be undone; only then may expiry approve it."
    )

    @model_validator(mode="after")
    def _approve_only_when_reversible(self) -> ApprovalDeadline:
        if self.on_expiry == "approve" and not self.reversible:
            raise ValueError(
                "on_expiry 'approve' needs reversible: true (an irreversible action is never "
                "approved without the operator); use 'reject' or 'escalate'"
            )
        return self


def _default_approval_deadlines() -> dict[str, ApprovalDeadline]:
    return {"publish": ApprovalDeadline(hours=48, on_expiry="escalate")}


class PolicySettings(_Section):
    """The policy engine: budgets, what to do when one would be passed, retries, breakers."""

    budgets: BudgetSettings = BudgetSettings()
    on_budget_exceeded: dict[str, OverBudget] = Field(
        default_factory=dict, description="Workflow -> lower_tier, rules or pause."
    )
    default_on_budget_exceeded: OverBudget = "rules"
    retries: RetrySettings = RetrySettings()
    breakers: BreakerSettings = BreakerSettings()
    roles: dict[str, RolePolicy] = Field(
        default_factory=dict, description="Role name -> its confidence threshold and value."
    )
    approval_deadlines: dict[str, ApprovalDeadline] = Field(
        default_factory=_default_approval_deadlines,
        description="Action type ('publish', or '<workflow>/<action>' for one workflow) -> its "
        "approval deadline and what happens on expiry.",
    )

    def over_budget_action(self, workflow: str) -> OverBudget:
        """What a workflow does when a call would pass a budget."""
        return self.on_budget_exceeded.get(workflow, self.default_on_budget_exceeded)

    def role(self, name: str) -> RolePolicy:
        """A role's policy (defaults when the operator set none)."""
        return self.roles.get(name, RolePolicy())


class PaymentsSettings(_Section):
    """Where the payments API (Stripe's shape) is and which environment variable holds its key."""

    base_url: str = Field(default="https://api.stripe.com", min_length=1)
    api_key_env: str = "AIOS_PAYMENTS_API_KEY"
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    refund_lookup_pages: int = Field(default=10, ge=1, le=100)
    """Pages of 100 recent refunds `lookup` scans for a refund's key (Stripe cannot search
    refunds by metadata)."""

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a secret key")
        return value

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


class GhostCmsSettings(_Section):
    """Where the Ghost Admin API is and which environment variable holds its Admin API key."""

    admin_url: str = Field(min_length=1, description="The site root, e.g. https://blog.example.com")
    admin_key_env: str = "AIOS_GHOST_ADMIN_KEY"
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)
    accept_version: str = "v5.0"

    @field_validator("admin_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("admin_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a key")
        return value


class DeploySettings(_Section):
    """The deploy webhook a rollback is requested through (your CI/CD or host's API)."""

    base_url: str = Field(min_length=1, description="e.g. https://deploy.example.com")
    token_env: str = "AIOS_DEPLOY_TOKEN"
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a secret token")
        return value

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


class RollbackPolicy(_Section):
    """When a rollback may run without the operator's approval (never, by default)."""

    auto_on_sla_breach: bool = Field(
        default=False,
        description="Roll back automatically when a P1 ticket is past its SLA and the proposal "
        "is confident enough; otherwise every rollback waits for approval.",
    )
    min_confidence: float = Field(default=0.9, ge=0, le=1)
    high_impact_z: float = Field(
        default=10.0, gt=0, description="A regression this far off its normal is high impact."
    )


class SupportInboxSettings(_Section):
    """Where customer messages land on disk, and how they are batched into runs."""

    maildirs: list[Path] = Field(
        default_factory=list,
        description="Maildir folders (what mbsync or offlineimap write); read, never changed.",
    )
    drop_folders: list[Path] = Field(
        default_factory=list, description="Folders of *.jsonl files, one message per line."
    )
    poll_seconds: int = Field(default=30, ge=1, le=3600, description="Sensor interval.")
    batch_max_messages: int = Field(
        default=500, ge=1, le=100_000, description="Messages per run at most."
    )
    max_message_bytes: int = Field(default=10_000_000, ge=1_000)


SupportSeverity = Literal["P1", "P2", "P3", "P4"]


def _default_sla_hours() -> dict[SupportSeverity, list[float]]:
    return {"P1": [2.0, 4.0], "P2": [8.0, 24.0], "P3": [72.0]}


class SlaPolicy(_Section):
    """How long a ticket may wait for its reply before the operator is emailed, by severity.

    Each list holds the hours after which the next escalation goes out: with `P1: [2, 4]`, a
    P1 unanswered for 2 h emails the operator, and at 4 h it is escalated again. A plan may
    have its own hours (e.g. `plans: {business: {P2: [4, 8]}}`).
    """

    hours: dict[SupportSeverity, list[float]] = Field(default_factory=_default_sla_hours)
    plans: dict[str, dict[SupportSeverity, list[float]]] = Field(default_factory=dict)
    check_seconds: int = Field(default=60, ge=5, le=3600, description="Sensor interval.")

    @model_validator(mode="after")
    def _rising(self) -> SlaPolicy:
        tables = [("hours", self.hours)] + [(f"plans.{p}", t) for p, t in self.plans.items()]
        for where, table in tables:
            for severity, steps in table.items():
                if any(h <= 0 for h in steps) or steps != sorted(set(steps)):
                    raise ValueError(
                        f"{where}.{severity}: hours must be positive and rising, got {steps}"
                    )
        return self

    def thresholds(self, severity: str, plan: str) -> list[float]:
        """The escalation hours for a ticket of this severity on this plan."""
        table = self.plans.get(plan.lower(), {})
        key = severity if severity in ("P1", "P2", "P3", "P4") else "P3"
        return list(table.get(key, self.hours.get(key, [])))  # type: ignore[call-overload]


class TelemetrySettings(_Section):
    """Where product telemetry is and when a bucket of it is an anomaly."""

    sources: list[str] = Field(
        default_factory=list,
        description="CSV or Parquet files (relative to this file), or `table:<schema.name>` in "
        "the facts warehouse: time buckets with release, errors, latency_ms, signups.",
    )
    window: int = Field(default=24, ge=3, le=10_000, description="Earlier buckets compared.")
    min_window: int = Field(default=5, ge=3, le=10_000)
    z: float = Field(default=4.0, gt=0, le=100, description="Robust deviations that alarm.")
    check_seconds: int = Field(default=300, ge=5, le=86_400, description="Sensor interval.")


class ReleaseNotesSettings(_Section):
    """Where releases are tagged and where their approved notes are published."""

    repo: Path | None = Field(
        default=None, description="The product's git repository (relative to this file)."
    )
    changelog: Path = Field(
        default=Path("CHANGELOG.md"), description="Relative paths sit in the repository."
    )
    issues_file: Path | None = Field(
        default=None,
        description="JSON list of {number, title} (an issue tracker export) to name the issues "
        "a release closed.",
    )
    publish_to: Literal["changelog", "cms"] = "changelog"
    check_seconds: int = Field(default=300, ge=5, le=86_400, description="Tag sensor interval.")


class SupportSettings(_Section):
    """The indie SaaS support workflow."""

    product: str = Field(default="our product", description="What customers write about.")
    inbox: SupportInboxSettings = SupportInboxSettings()
    triage_concurrency: int = Field(
        default=8, ge=1, le=256, description="Messages triaged at once (model calls in flight)."
    )
    known_issue_matches: int = Field(
        default=3, ge=0, le=20, description="Known issues recalled per message as candidates."
    )
    sla: SlaPolicy = SlaPolicy()
    telemetry: TelemetrySettings = TelemetrySettings()
    rollback: RollbackPolicy = RollbackPolicy()
    release_notes: ReleaseNotesSettings = ReleaseNotesSettings()


class AiosConfig(_Section):
    """The whole operator configuration."""

    state_dir: Path = Field(
        default=Path(".aios"),
        description="Ledger, warehouse, staged payloads, artifacts. Relative to the config file.",
    )
    operator: OperatorIdentity = OperatorIdentity()
    llm: LLMSettings = LLMSettings()
    newsletter: NewsletterSettings = NewsletterSettings()
    memory: MemorySettings = MemorySettings()
    policy: PolicySettings = PolicySettings()
    smtp: SmtpSettings | None = None
    payments: PaymentsSettings | None = None
    cms: GhostCmsSettings | None = None
    support: SupportSettings = SupportSettings()
    deploy: DeploySettings | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path)
    # Not a field: it comes from where the file is, never from what it says.

    @property
    def base_dir(self) -> Path:
        """Directory relative paths are resolved against (the config file's folder)."""
        return self._base_dir

    def resolve(self, path: Path) -> Path:
        """A config path made absolute against the config file's folder."""
        expanded = path.expanduser()
        return expanded if expanded.is_absolute() else (self.base_dir / expanded).resolve()

    @property
    def state_path(self) -> Path:
        """Absolute state directory."""
        return self.resolve(self.state_dir)

    @property
    def site_path(self) -> Path:
        """Absolute site output folder; relative values live inside the state directory."""
        site = self.newsletter.site_dir.expanduser()
        return site if site.is_absolute() else (self.state_path / site).resolve()

    def telemetry_locations(self) -> list[str]:
        """Telemetry sources with file paths resolved; warehouse tables as given."""
        return [
            source if source.startswith("table:") else str(self.resolve(Path(source)))
            for source in self.support.telemetry.sources
        ]

    def feed_locations(self) -> list[str]:
        """Feeds with local paths resolved; URLs as given."""
        out: list[str] = []
        for feed in self.newsletter.feeds:
            if re.match(r"^https?://", feed):
                out.append(feed)
            else:
                out.append(str(self.resolve(Path(feed.removeprefix("file://")))))
        return out


REMOVED_KEYS: dict[str, str] = {
    "llm.endpoint.max_retries": (
        "no longer supported: the SDK never retries, so retries cannot stack; set "
        "policy.retries.max_attempts instead (attempts in all, the first one included)"
    ),
}
"""Keys older configs may still set, with what replaces them (instead of 'unknown key')."""


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"invalid operator config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = REMOVED_KEYS.get(
                key, "unknown key (check the spelling; see aios.yaml in the repository)"
            )
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_config(
    data: Any, *, source: str = "(inline)", base_dir: Path | None = None
) -> AiosConfig:
    """Validate already-loaded YAML data; raises ConfigError naming each bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid operator config {source}: the top level must be a mapping")
    try:
        config = AiosConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    config._base_dir = (base_dir or Path.cwd()).resolve()
    return config


def config_path_from_env() -> Path | None:
    """The config file to read: $AIOS_CONFIG, else ./aios.yaml if present, else none."""
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        return Path(named).expanduser().resolve()
    local = Path.cwd() / DEFAULT_CONFIG_FILE
    return local.resolve() if local.exists() else None


def load_config(path: Path | None = None) -> AiosConfig:
    """Read and validate the operator config; no file means all defaults."""
    path = path if path is not None else config_path_from_env()
    if path is None:
        return parse_config({}, source="(defaults)", base_dir=Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"operator config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read operator config {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"operator config {path} is not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=path.parent)
