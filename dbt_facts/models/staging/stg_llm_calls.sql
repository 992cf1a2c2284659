-- Every model call with its day and whether a model (not the rules tier) made it.
select
    call_id,
    occurred_at,
    cast(occurred_at as date) as call_date,
    workflow,
    partition_key,
    step,
    role,
    tier,
    model,
    status,
    tier <> 'rules' as used_model,
    prompt_tokens,
    completion_tokens,
    prompt_tokens + completion_tokens as total_tokens,
    cost_usd,
    latency_ms,
    run_id
from {{ source('audit', 'llm_calls') }}
