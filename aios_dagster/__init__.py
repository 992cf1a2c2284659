"""aios-dagster's kernel: the parts every workflow shares.

One small module per concept, each keeping one of the promises in DESIGN.md: `config` (the
operator's file), `ledger` (transactional state), `warehouse` and `audit` (facts and the audit
trail), `gateway` and `agents` (model calls and the rules tier), `approvals` (gates bound to a
payload hash), `connectors` (the intent log and providers), `quarantine` and `sources` (untrusted
input). The kernel never imports the workflows (`assets/`), `resources/` or `sensors/`.
"""

__version__ = "0.1.0"
