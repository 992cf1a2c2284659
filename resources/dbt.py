"""The dbt_facts project: where it lives, and its manifest built once (never in every step).

Kept apart from the dbt assets so it imports without a manifest. The manifest is parsed when it
is missing or older than the project's files, under a file lock so concurrent processes (test
workers, a code server and the CLI) wait for one parse instead of racing on the target folder.
"""

import fcntl
import os
import shutil
import sys
from pathlib import Path

from dagster_dbt import DbtCliResource, DbtProject

DBT_PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt_facts"

dbt_facts_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def dbt_executable() -> str:
    """The dbt installed beside this interpreter (a venv not on PATH), else dbt from PATH."""
    beside = Path(sys.executable).parent / "dbt"
    if beside.exists():
        return str(beside)
    return shutil.which("dbt") or "dbt"


def dbt_resource() -> DbtCliResource:
    """The dbt CLI resource for the facts project (no usage stats sent: we run offline)."""
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    return DbtCliResource(project_dir=dbt_facts_project, dbt_executable=dbt_executable())


def _newest_source_mtime() -> float:
    files = [DBT_PROJECT_DIR / "dbt_project.yml", DBT_PROJECT_DIR / "profiles.yml"]
    files += DBT_PROJECT_DIR.glob("models/**/*")
    files += DBT_PROJECT_DIR.glob("macros/**/*")
    files += DBT_PROJECT_DIR.glob("tests/**/*")
    return max(f.stat().st_mtime for f in files if f.is_file())


def _fresh(manifest: Path) -> bool:
    return manifest.exists() and manifest.stat().st_mtime >= _newest_source_mtime()


def ensure_manifest() -> Path:
    """The manifest's path, parsing the project first if it is missing or stale."""
    manifest = dbt_facts_project.manifest_path
    if _fresh(manifest):
        return manifest
    lock_path = DBT_PROJECT_DIR / ".manifest.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _fresh(manifest):
            dbt_resource().cli(
                ["parse", "--quiet"], target_path=dbt_facts_project.target_path
            ).wait()
    return manifest
