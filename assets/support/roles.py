"""The support workflow's agent roles."""

from __future__ import annotations

from aios_dagster.agents import AgentRole
from assets.support.checks import triage_checks
from assets.support.models import Triage, TriageInput
from assets.support.prompts import triager_prompt
from assets.support.rules import triage_by_rules

TRIAGER: AgentRole[TriageInput, Triage] = AgentRole(
    name="triager",
    purpose="classify a customer message, rate its severity, spot duplicates, draft a reply",
    output_model=Triage,
    prompt=triager_prompt,
    rules=triage_by_rules,
    checks=triage_checks,
    # Reading a message, looking up the customer and known issues, writing a first reply.
    manual_minutes=6.0,
)
