-- Approval requests: the work item (outcome) they are for, their status and latest decision.
select
    approval_id,
    workflow,
    partition_key,
    workflow || '/' || partition_key as outcome_id,
    action,
    payload_hash,
    status,
    requested_at,
    requested_by_run,
    decided_at,
    decided_by,
    decision_reason,
    decision_seq,
    executed_at,
    executed_by_run,
    executed_at is not null as executed,
    cost_so_far_usd,
    cost_to_finish_usd
from {{ source('ledger', 'approvals') }}
