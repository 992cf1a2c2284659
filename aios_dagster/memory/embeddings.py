"""Embedders: text to unit-length float32 vectors, the same contract offline or on an endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
"""Shape (n, dimensions), each row L2-normalized, so a dot product is a cosine similarity."""


class Embedder(Protocol):
    """Anything that turns texts into comparable vectors."""

    @property
    def name(self) -> str:
        """Model identity, stored beside every vector (vectors of two models never mix)."""
        ...

    @property
    def dimensions(self) -> int:
        """Length of each vector."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Vectors for the texts, in order."""
        ...
