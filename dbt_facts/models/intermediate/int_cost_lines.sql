-- Every cost line of the audit trail in one shape: a model call (or its rules-tier stand-in,
-- which costs nothing) or a provider's fee for an effect. The cost marts all sum these lines,
-- so they reconcile with each other by construction.
select
    call_id as line_id,
    'model' as line_kind,
    occurred_at,
    workflow,
    partition_key,
    step,
    run_id,
    cast(null as varchar) as effect_action,
    1 as llm_calls,
    case when used_model then 1 else 0 end as model_calls,
    0 as charges,
    cost_usd as model_usd,
    0.0 as fees_usd
from {{ ref('stg_llm_calls') }}

union all

select
    cost_id as line_id,
    'fee' as line_kind,
    occurred_at,
    workflow,
    partition_key,
    step,
    run_id,
    action as effect_action,
    0 as llm_calls,
    0 as model_calls,
    1 as charges,
    0.0 as model_usd,
    amount_usd as fees_usd
from {{ ref('stg_effect_costs') }}
