-- What each workflow cost per day: model calls and providers' fees side by side, the number
-- an operator compares with what the workflow earned.
with model_spend as (
    select call_date as spend_date, workflow, sum(cost_usd) as model_usd, count(*) as model_calls
    from {{ ref('stg_llm_calls') }}
    group by all
),

provider_fees as (
    select cost_date as spend_date, workflow, sum(amount_usd) as fees_usd, count(*) as charges
    from {{ ref('stg_effect_costs') }}
    group by all
)

select
    coalesce(m.spend_date, f.spend_date) as spend_date,
    coalesce(m.workflow, f.workflow) as workflow,
    round(coalesce(m.model_usd, 0), 6) as model_usd,
    coalesce(m.model_calls, 0) as model_calls,
    round(coalesce(f.fees_usd, 0), 6) as fees_usd,
    coalesce(f.charges, 0) as charges,
    round(coalesce(m.model_usd, 0) + coalesce(f.fees_usd, 0), 6) as total_usd
from model_spend as m
full outer join provider_fees as f
    on m.spend_date = f.spend_date and m.workflow = f.workflow
