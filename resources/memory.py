"""The three memory tiers as Dagster resources, so the lineage shows which steps use which.

Each is a thin view of the kernel wired to the operator's config: the same working set, index
and facts store the CLI and every other step see.
"""

from typing import TYPE_CHECKING

import dagster as dg

from aios_dagster.memory.facts import FactStore
from aios_dagster.memory.working_set import WorkingSet
from resources.kernel import AiosKernel

if TYPE_CHECKING:  # LanceDB costs about 1.5 s to import: only processes that search pay it
    from aios_dagster.memory.semantic_index import SemanticIndex


class WorkingMemory(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Each workflow's working set: recent interactions, active artifacts, open questions."""

    aios: AiosKernel

    def for_workflow(self, workflow: str) -> WorkingSet:
        """The workflow's working set, refreshed from the ledger if another process wrote."""
        return self.aios.kernel().working_set(workflow)


class SemanticMemory(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The LanceDB semantic index of sources, published work, notes and feedback."""

    aios: AiosKernel

    def index(self) -> "SemanticIndex":
        """The index (embedder per `memory.embeddings`), opened once per process."""
        return self.aios.kernel().semantic_index()


class FactMemory(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Canonical business facts with their change log (DuckDB)."""

    aios: AiosKernel

    def store(self) -> FactStore:
        """The facts store; agents may only propose changes through it."""
        return self.aios.kernel().facts
