"""Component definitions folder for `dg` (kept empty: the code location is `definitions.py`)."""
