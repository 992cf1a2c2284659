-- How often calls to each model fail, with the tiers it served, its spend and latency.
select
    model,
    string_agg(distinct tier, ', ' order by tier) as tiers,
    count(*) as model_calls,
    count(*) filter (where status = 'error') as failed_calls,
    round(count(*) filter (where status = 'error') / count(*), 6) as error_rate,
    round(sum(cost_usd), 6) as cost_usd,
    round(avg(latency_ms), 2) as avg_latency_ms
from {{ ref('stg_llm_calls') }}
where used_model
group by model
