-- How often calls on each model tier (draft, verify) fail. The rules tier calls no model.
select
    tier,
    count(*) as model_calls,
    count(*) filter (where status = 'error') as failed_calls,
    round(count(*) filter (where status = 'error') / count(*), 6) as error_rate,
    round(sum(cost_usd), 6) as cost_usd
from {{ ref('stg_llm_calls') }}
where used_model
group by tier
