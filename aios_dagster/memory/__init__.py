"""Memory shared by every agent: a working set, a semantic index and structured facts.

Each tier is its own module; every write is also appended to the cold store (Parquet) so exports
never depend on the live tables.
"""

SEMANTIC_TABLE = "chunks"
"""The LanceDB table of the semantic index (kept here, where importing it costs nothing, so the
kernel can tell whether the index was ever written without loading LanceDB)."""
