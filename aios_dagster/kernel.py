"""The kernel wired to one operator's configuration: every store and service, built once.

Dagster resources, the CLI and tests all get their ledger, warehouse, audit log, approvals,
intent log, quarantine and agent runtime from here, so they always agree on where state lives.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from aios_dagster.agents import AgentRuntime
from aios_dagster.approvals import ApprovalDesk
from aios_dagster.audit import AuditLog, Redactor
from aios_dagster.config import AiosConfig
from aios_dagster.connectors.intent_log import IntentLog
from aios_dagster.gateway import LLMGateway
from aios_dagster.inbound.inbox import Inbox
from aios_dagster.ledger import Ledger
from aios_dagster.memory import SEMANTIC_TABLE
from aios_dagster.memory.cold_store import ColdStore
from aios_dagster.memory.facts import FactStore
from aios_dagster.memory.working_set import WorkingSet
from aios_dagster.policy.breakers import CircuitBreakers
from aios_dagster.policy.budgets import Budgets, LeasePolicy
from aios_dagster.policy.engine import ModelCaller
from aios_dagster.policy.training import TrainingQueue
from aios_dagster.published import PublishedWork
from aios_dagster.quarantine import Quarantine
from aios_dagster.support.tickets import TicketBook
from aios_dagster.warehouse import Warehouse

if TYPE_CHECKING:
    # LanceDB takes about two seconds to import: only processes that recall pay for it.
    from aios_dagster.memory.semantic_index import SemanticIndex


BREAKER_FRESH_SECONDS = 0.05
"""How long a process reuses a breaker's closed-path read (see CircuitBreakers.fresh_seconds)."""


@dataclass(frozen=True)
class StatePaths:
    """Where each store lives inside the state directory."""

    root: Path

    @property
    def ledger(self) -> Path:
        """The SQLite ledger file."""
        return self.root / "ledger.sqlite"

    @property
    def warehouse(self) -> Path:
        """The DuckDB facts warehouse file."""
        return self.root / "warehouse.duckdb"

    @property
    def staged(self) -> Path:
        """Content-addressed payloads awaiting or bound to approvals."""
        return self.root / "staged"

    @property
    def drafts(self) -> Path:
        """Readable copies of the latest draft per work item, for the operator."""
        return self.root / "drafts"

    @property
    def artifacts(self) -> Path:
        """Asset values as JSON (the IO manager's folder)."""
        return self.root / "artifacts"

    @property
    def quarantine(self) -> Path:
        """Inputs held back with their reasons."""
        return self.root / "quarantine"

    @property
    def audit_spool(self) -> Path:
        """Audit rows waiting for the warehouse lock."""
        return self.root / "audit_spool"

    @property
    def semantic_index(self) -> Path:
        """The LanceDB folder of the semantic memory."""
        return self.root / "memory" / "lancedb"

    @property
    def cold_store(self) -> Path:
        """Date-partitioned Parquet copies of every memory write."""
        return self.root / "memory" / "cold"

    @property
    def dagster_home(self) -> Path:
        """The default DAGSTER_HOME for the CLI when none is set."""
        return self.root / "dagster"


@dataclass
class Kernel:
    """All kernel services for one configuration."""

    config: AiosConfig
    paths: StatePaths
    ledger: Ledger
    warehouse: Warehouse
    audit: AuditLog
    approvals: ApprovalDesk
    intents: IntentLog
    quarantine: Quarantine
    inbox: Inbox
    tickets: TicketBook
    published: PublishedWork
    gateway: LLMGateway
    agents: AgentRuntime
    facts: FactStore
    cold_store: ColdStore
    training: TrainingQueue
    budgets: Budgets
    breakers: CircuitBreakers
    _working_sets: dict[str, WorkingSet] = field(default_factory=dict)
    _llm_api_key: str | None = field(default=None, repr=False)
    _semantic_index: SemanticIndex | None = field(default=None, repr=False)
    _semantic_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def semantic_memory_written(self) -> bool:
        """Whether anything was ever ingested into semantic memory, by a look at its folder: a
        search of an index never written finds nothing, and opening it costs LanceDB's import
        (about 1.5 s), which a step that only needs to know "nothing yet" should not pay."""
        return (self.paths.semantic_index / f"{SEMANTIC_TABLE}.lance").exists()

    def semantic_index(self) -> SemanticIndex:
        """The semantic memory (LanceDB), opened on first use and kept for this kernel.

        Lazy because it builds the embedder (`memory.embeddings`), and a kernel that never
        recalls anything (the CLI listing approvals, a sensor tick) should not pay for it; the
        kernel itself is built once per process, and so is this. Reads are strongly consistent
        (runs, the CLI and tests write the same folder from other objects and processes), and
        while the index is still empty it is reopened on each call, so a table another process
        created since is seen. Raises ConfigError or EmbeddingError when the configured embedder
        cannot work.
        """
        with self._semantic_lock:
            index = self._semantic_index
            if index is None or index.count() == 0:
                from aios_dagster.memory.embeddings import embedder_for
                from aios_dagster.memory.semantic_index import SemanticIndex

                embedder = index.embedder if index else embedder_for(self.config, self._llm_api_key)
                index = SemanticIndex(
                    self.paths.semantic_index,
                    embedder,
                    self.config.memory,
                    cold_store=self.cold_store,
                    audit=self.audit,
                    quarantine=self.quarantine,
                    read_consistency_interval=timedelta(0),
                )
                self._semantic_index = index
            return index

    def working_set(self, workflow: str) -> WorkingSet:
        """The workflow's working set, loaded once per process and refreshed on each call."""
        ws = self._working_sets.get(workflow)
        if ws is None:
            ws = WorkingSet(self.ledger, workflow, max_entries=self.config.memory.working_set_items)
            self._working_sets[workflow] = ws
        return ws.load()

    @classmethod
    def build(
        cls,
        config: AiosConfig,
        *,
        llm_api_key: str | None = None,
        smtp_password: str | None = None,
        other_secrets: Sequence[str | None] = (),
    ) -> Kernel:
        """Wire every service to the state directory the config names."""
        paths = StatePaths(config.state_path)
        paths.root.mkdir(parents=True, exist_ok=True)
        ledger = _ledger_for(paths.ledger)
        warehouse = Warehouse(paths.warehouse)
        audit = AuditLog(
            warehouse,
            paths.audit_spool,
            redactor=Redactor([llm_api_key, smtp_password, *other_secrets]),
        )
        gateway = LLMGateway(
            config.llm, api_key=llm_api_key, audit=audit, retries=config.policy.retries
        )
        budgets = Budgets(ledger, config.policy.budgets, audit=audit, lease=LeasePolicy())
        breakers = CircuitBreakers(
            ledger, config.policy.breakers, audit=audit, fresh_seconds=BREAKER_FRESH_SECONDS
        )
        cold_store = ColdStore(paths.cold_store)
        # An operator's rejection lands in the retraining queue with the rejected payload.
        training = TrainingQueue(ledger, audit, cold_store)
        approvals = ApprovalDesk(
            ledger,
            paths.staged,
            audit,
            drafts_dir=paths.drafts,
            on_reject=training.record_rejection,
            on_approve=training.record_approval,
        )
        quarantine = Quarantine(paths.quarantine, audit)
        return cls(
            config=config,
            paths=paths,
            ledger=ledger,
            warehouse=warehouse,
            audit=audit,
            approvals=approvals,
            intents=IntentLog(ledger, audit, breakers=breakers, retries=config.policy.retries),
            quarantine=quarantine,
            inbox=Inbox(ledger, quarantine),
            tickets=TicketBook(ledger),
            published=PublishedWork(ledger),
            gateway=gateway,
            agents=AgentRuntime(
                config.llm,
                gateway,
                audit,
                caller=ModelCaller(config.llm, gateway, budgets, breakers),
                policy=config.policy,
                training=training,
            ),
            facts=FactStore(warehouse, approvals, audit, cold_store=cold_store),
            cold_store=cold_store,
            training=training,
            budgets=budgets,
            breakers=breakers,
            _llm_api_key=llm_api_key,
        )


_ledgers: dict[Path, Ledger] = {}
_ledgers_lock = threading.Lock()


def _ledger_for(path: Path) -> Ledger:
    # One engine (connection pool) per ledger file per process.
    with _ledgers_lock:
        ledger = _ledgers.get(path)
        if ledger is None:
            ledger = Ledger.at(path)
            _ledgers[path] = ledger
        return ledger
