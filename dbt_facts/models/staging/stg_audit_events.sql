-- Decisions, quarantines, approvals and effects, one row each.
select
    event_id,
    occurred_at,
    cast(occurred_at as date) as event_date,
    kind,
    workflow,
    partition_key,
    step,
    actor,
    subject,
    decision,
    reason,
    run_id
from {{ source('audit', 'events') }}
