-- What each step of each workflow costs per day, by tier and model: the first ROI signal.
select
    call_date,
    workflow,
    step,
    tier,
    model,
    count(*) as calls,
    count(*) filter (where status = 'error') as failed_calls,
    sum(prompt_tokens) as prompt_tokens,
    sum(completion_tokens) as completion_tokens,
    round(sum(cost_usd), 6) as cost_usd,
    round(avg(latency_ms), 2) as avg_latency_ms
from {{ ref('stg_llm_calls') }}
group by all
