"""The newsletter's agent roles: who makes each work product, with which prompt, and the
rules-tier stand-in that makes it when no model is available."""

from __future__ import annotations

from aios_dagster.agents import AgentRole
from assets.newsletter.checks import draft_checks, outline_checks
from assets.newsletter.models import Draft, DrafterInput, Outline, PlannerInput
from assets.newsletter.prompts import drafter_prompt, planner_prompt
from assets.newsletter.rules import plan_issue, write_issue

PLANNER: AgentRole[PlannerInput, Outline] = AgentRole(
    name="planner",
    purpose="rank this week's items for the audience and group them into sections",
    output_model=Outline,
    prompt=planner_prompt,
    rules=plan_issue,
    checks=outline_checks,
    # Reading the week's items and ranking them into sections by hand.
    manual_minutes=30.0,
)

DRAFTER: AgentRole[DrafterInput, Draft] = AgentRole(
    name="drafter",
    purpose="write the issue from the outline, one story per item, citing each source",
    output_model=Draft,
    prompt=drafter_prompt,
    rules=write_issue,
    checks=draft_checks,
    # Writing the issue by hand from an outline, one cited story per item.
    manual_minutes=90.0,
)
