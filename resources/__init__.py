"""Dagster resources wiring the kernel to the operator's config file (and secrets from env)."""

from resources.artifacts import ArtifactIOManager
from resources.kernel import AiosKernel
from resources.mailer import MailerResource
from resources.memory import FactMemory, SemanticMemory, WorkingMemory
from resources.site import SitePublisherResource
from resources.wiring import build_resources

__all__ = [
    "AiosKernel",
    "ArtifactIOManager",
    "FactMemory",
    "MailerResource",
    "SemanticMemory",
    "SitePublisherResource",
    "WorkingMemory",
    "build_resources",
]
