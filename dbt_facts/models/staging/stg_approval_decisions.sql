-- The operator's decisions, one row each (an approval made current again can be decided twice).
select
    approval_id || '@' || cast(epoch_us(decided_at) as varchar) as decision_id,
    approval_id,
    decision,
    actor,
    decided_at,
    payload_hash,
    reason
from {{ source('ledger', 'approval_decisions') }}
