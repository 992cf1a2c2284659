"""All resources of the code location, built from the operator config in one place.

The config is validated here, when Definitions load, so a bad value stops the code location with
a message naming the key. Secrets are passed as Dagster `EnvVar`s, never as values.
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg

from aios_dagster.config import config_path_from_env, load_config
from resources.artifacts import ArtifactIOManager
from resources.cms import CmsResource
from resources.crm import CrmResource
from resources.dbt import dbt_resource
from resources.kernel import AiosKernel
from resources.mailer import MailerResource
from resources.memory import FactMemory, SemanticMemory, WorkingMemory
from resources.payments import PaymentsResource
from resources.site import SitePublisherResource


def _env_secret(name: str) -> Any:
    # EnvVar keeps the value out of the run config and the UI; an unset variable means none.
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources(config_path: Path | None = None) -> dict[str, Any]:
    """Every resource the workflows need, from the operator config (validated here, early)."""
    path = config_path if config_path is not None else config_path_from_env()
    config = load_config(path)
    kernel = AiosKernel(
        config_file=str(path) if path else None,
        base_dir=str(Path.cwd()),
        llm_api_key=_env_secret(config.llm.endpoint.api_key_env),
    )
    smtp_password = _env_secret(config.smtp.password_env) if config.smtp else None
    connectors: dict[str, Any] = {}
    # Optional providers: present only when the operator config has their section. Each reads
    # its key from the environment variable the section names, when a step acts.
    if config.payments is not None:
        connectors["payments"] = PaymentsResource(
            base_url=config.payments.base_url,
            api_key_env=config.payments.api_key_env,
            timeout_seconds=config.payments.timeout_seconds,
        )
    if config.cms is not None:
        connectors["cms"] = CmsResource(
            admin_url=config.cms.admin_url,
            admin_key_env=config.cms.admin_key_env,
            timeout_seconds=config.cms.timeout_seconds,
        )
    return {
        **connectors,
        "crm": CrmResource(aios=kernel),  # in the facts warehouse until the operator names one
        "aios": kernel,
        "site": SitePublisherResource(aios=kernel),
        "mailer": MailerResource(aios=kernel, password=smtp_password),
        "io_manager": ArtifactIOManager(root=str(config.state_path / "artifacts")),
        "dbt": dbt_resource(),
        "working_memory": WorkingMemory(aios=kernel),
        "semantic_memory": SemanticMemory(aios=kernel),
        "fact_memory": FactMemory(aios=kernel),
    }
