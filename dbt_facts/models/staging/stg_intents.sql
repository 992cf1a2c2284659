-- Side effects by idempotency key: what was done (or is pending) for which work item.
select
    idempotency_key,
    workflow,
    item_key,
    workflow || '/' || item_key as outcome_id,
    action,
    target,
    connector,
    state,
    attempts,
    provider_id,
    created_at,
    updated_at,
    run_id
from {{ source('ledger', 'intents') }}
