"""A git repository's tags and the commits between two of them, read with the git CLI.

Why the CLI: it is on every machine that has the repository, reads any repository git can, and
needs no library; the output is asked for in a format with unit and record separators, so
subjects and bodies with any characters come back whole. Issues a commit closes are read from
GitHub/GitLab closing keywords ("Fixes #12", "closes #3", "Resolves #7").
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

CLOSING = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+#(\d+)", re.IGNORECASE)
_UNIT, _RECORD = "\x1f", "\x1e"


class GitError(RuntimeError):
    """git could not answer (no repository, unknown tag); the message says what git said."""


class Commit(BaseModel):
    """One commit between two tags."""

    sha: str
    author: str
    date: datetime
    subject: str
    body: str
    closes: list[int]


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git {' '.join(args[:2])} in {repo}: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args[:2])} in {repo}: {done.stderr.strip()[:500]}")
    return done.stdout


def tags(repo: Path) -> list[str]:
    """The repository's tags, oldest first (by the tagged commit's date, then name)."""
    out = _git(repo, "for-each-ref", "--sort=creatordate", "--format=%(refname:short)", "refs/tags")
    return [line.strip() for line in out.splitlines() if line.strip()]


def commits_between(repo: Path, since: str | None, until: str) -> list[Commit]:
    """Commits reachable from `until` and not from `since` (all of them when `since` is None),
    oldest first, merges left out."""
    span = until if since is None else f"{since}..{until}"
    fmt = _UNIT.join(["%H", "%an", "%aI", "%s", "%b"]) + _RECORD
    out = _git(repo, "log", "--no-merges", "--reverse", f"--format={fmt}", span, "--")
    commits = []
    for record in out.split(_RECORD):
        fields = record.strip("\n").split(_UNIT)
        if len(fields) != 5:
            continue
        sha, author, date, subject, body = fields
        closes = sorted({int(n) for n in CLOSING.findall(f"{subject}\n{body}")})
        commits.append(
            Commit(
                sha=sha,
                author=author,
                date=datetime.fromisoformat(date),
                subject=subject.strip(),
                body=body.strip(),
                closes=closes,
            )
        )
    return commits
