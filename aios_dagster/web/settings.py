"""How the inbox is served: where it listens, where the Dagster UI is, how long sessions last."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"
DAGSTER_URL_ENV = "AIOS_DAGSTER_URL"
TOKEN_ENV = "AIOS_INBOX_TOKEN"
"""Set it to choose the token yourself (e.g. behind a tunnel); by default each start makes one."""


class InboxSettings(BaseModel):
    """The inbox's serving options (validated at start)."""

    model_config = ConfigDict(frozen=True)

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    dagster_url: str = DEFAULT_DAGSTER_URL
    """The Dagster UI (`dagster dev`), for the link from an approval to the run behind it."""
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    max_form_bytes: int = Field(default=2_000_000, ge=1_000)
    """A form larger than this (an edited draft, typically) is refused with 413."""

    @field_validator("dagster_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:3000")
        return value.rstrip("/")

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the inbox."""
        return self.host in ("127.0.0.1", "localhost", "::1")

    def run_url(self, run_id: str) -> str:
        """The Dagster UI page of one run."""
        return f"{self.dagster_url}/runs/{run_id}"
