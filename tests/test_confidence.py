"""Confidence combines the model's word with our checks; it decides when verify spends."""

from __future__ import annotations

from aios_dagster.policy.confidence import ConfidenceSignals, combined_confidence, decide_verify


def test_a_schema_failure_is_zero_whatever_the_model_says() -> None:
    assert combined_confidence(ConfidenceSignals(schema_valid=False, reported=0.99)) == 0.0


def test_checks_cap_an_overconfident_model() -> None:
    signals = ConfidenceSignals(reported=0.95, checks_passed=2, checks_total=4)
    assert combined_confidence(signals) == 0.5


def test_all_signals_are_weighted() -> None:
    signals = ConfidenceSignals(
        reported=0.9, checks_passed=4, checks_total=4, retrieval_similarity=0.6
    )
    assert combined_confidence(signals) == round((0.9 + 2 * 1.0 + 0.6) / 4, 4)


def test_no_evidence_is_a_coin_flip() -> None:
    assert combined_confidence(ConfidenceSignals()) == 0.5


def test_verify_runs_below_the_threshold_or_for_high_value_actions() -> None:
    sure = ConfidenceSignals(reported=0.9, checks_passed=3, checks_total=3)
    unsure = ConfidenceSignals(reported=0.9, checks_passed=1, checks_total=3)
    assert not decide_verify(sure, threshold=0.7, high_value=False).verify
    low = decide_verify(unsure, threshold=0.7, high_value=False)
    assert low.verify and "below 0.70" in low.reason
    assert decide_verify(sure, threshold=0.7, high_value=True).verify
    assert not decide_verify(unsure, threshold=0.7, high_value=True, verify_allowed=False).verify
    # A failed check always escalates, however low the threshold.
    waved = decide_verify(unsure, threshold=0.1, high_value=False)
    assert waved.verify and waved.reason == "2 of 3 checks failed"
