-- Configured ceilings: the default per kind (workflow null) and per-workflow daily overrides.
select kind, workflow, limit_usd
from {{ source('ledger', 'budget_limits') }}
