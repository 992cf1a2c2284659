"""Quick checks of a triage against its input, computed by us: they feed the triage's
confidence and make a model's output be repaired or replaced by the rules tier."""

from __future__ import annotations

import re

from aios_dagster.agents import RoleCheck
from assets.support.models import Triage, TriageInput

_LINK = re.compile(r"https?://|www\.", re.IGNORECASE)
_PROMISE = re.compile(
    r"\b(we|i)\s*(will|'ll|have|are going to)\s+(refund|credit|reimburse)", re.IGNORECASE
)


def triage_checks(inputs: TriageInput, triage: Triage) -> list[RoleCheck]:
    """Duplicate from the list, a reply unless spam, no links and no refund promises in it."""
    known = {k.issue_id for k in inputs.known_issues}
    return [
        RoleCheck(
            "duplicate_from_known_issues",
            triage.duplicate_of is None or triage.duplicate_of in known,
            f"'{triage.duplicate_of}' is not a known issue given" if triage.duplicate_of else "",
        ),
        RoleCheck(
            "reply_unless_spam",
            bool(triage.reply.strip()) != (triage.category == "spam"),
            "spam must get no reply" if triage.category == "spam" else "no reply drafted",
        ),
        RoleCheck(
            "no_links_in_reply",
            not _LINK.search(triage.reply),
            "the reply carries a link (links come only from the operator)",
        ),
        RoleCheck(
            "no_refund_promised",
            not _PROMISE.search(triage.reply),
            "the reply promises a refund: only the operator decides one",
        ),
    ]
