"""The kernel as a Dagster resource: the operator's config file plus secrets from the environment.

Every step gets the same ledger, warehouse, audit log, approvals desk, intent log, quarantine and
agent runtime through this one resource. The audit buffer is flushed when the step ends.
"""

import hashlib
import os
import threading
from pathlib import Path

import dagster as dg

from aios_dagster.config import AiosConfig, load_config, parse_config
from aios_dagster.kernel import Kernel

_kernels: dict[tuple[str | None, tuple[int, int], str, str], Kernel] = {}
_kernels_lock = threading.Lock()


def _file_version(path: str | None) -> tuple[int, int]:
    # An edited config file builds a fresh kernel in a long-lived process (code server, daemon).
    if not path:
        return (0, 0)
    try:
        stat = Path(path).stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


class AiosKernel(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The kernel services configured by the operator's YAML file."""

    config_file: str | None = None
    """Absolute path of the operator config; None means every default."""
    base_dir: str = "."
    """Folder relative paths resolve against when there is no config file."""
    llm_api_key: str | None = None
    """The model endpoint's API key, from the env var the config names (never in the file)."""

    def operator_config(self) -> AiosConfig:
        """The validated operator config."""
        if self.config_file:
            return load_config(Path(self.config_file))
        return parse_config({}, source="(defaults)", base_dir=Path(self.base_dir))

    def kernel(self) -> Kernel:
        """The kernel for this config, built once per process."""
        key_digest = hashlib.sha256((self.llm_api_key or "").encode()).hexdigest()
        cache_key = (self.config_file, _file_version(self.config_file), self.base_dir, key_digest)
        with _kernels_lock:
            kernel = _kernels.get(cache_key)
            if kernel is None:
                config = self.operator_config()
                smtp_password = os.environ.get(config.smtp.password_env) if config.smtp else None
                # Connectors read their own keys when they act; the audit must know them too,
                # so a key echoed in a provider's error never reaches an audit row.
                connector_secrets = [
                    os.environ.get(config.payments.api_key_env) if config.payments else None,
                    os.environ.get(config.cms.admin_key_env) if config.cms else None,
                ]
                kernel = Kernel.build(
                    config,
                    llm_api_key=self.llm_api_key,
                    smtp_password=smtp_password,
                    other_secrets=connector_secrets,
                )
                _kernels[cache_key] = kernel
            return kernel

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Nothing audited in a step may be left in memory when it ends."""
        with _kernels_lock:
            kernels = list(_kernels.values())
        for kernel in kernels:
            kernel.budgets.flush()  # this step's budget leases, settled at what they spent
            kernel.audit.flush()
