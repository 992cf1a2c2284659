-- Every cost a connector's provider charged (payment fees), with its day.
select
    cost_id,
    occurred_at,
    cast(occurred_at as date) as cost_date,
    workflow,
    partition_key,
    step,
    connector,
    action,
    idempotency_key,
    provider_id,
    kind,
    amount_usd,
    run_id
from {{ source('audit', 'effect_costs') }}
