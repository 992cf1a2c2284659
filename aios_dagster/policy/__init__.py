"""The policy engine: how every LLM call spends, retries, trips and escalates.

`budgets` (dollar reservations in the ledger), `retries` (transient failures only), `breakers`
(per endpoint and connector, shared across processes), `training` (the retraining queue), and the
engine that puts every call under all of them.
"""
