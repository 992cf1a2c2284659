-- What each workflow cost in all (model calls and providers' fees together), how many runs and
-- outcomes that bought, and the average cost of one outcome (from cost_per_outcome).
with costs as (
    select
        workflow,
        count(distinct run_id) as runs,
        min(occurred_at) as first_at,
        max(occurred_at) as last_at,
        sum(llm_calls) as llm_calls,
        sum(model_calls) as model_calls,
        sum(model_usd) as model_usd,
        sum(charges) as charges,
        sum(fees_usd) as fees_usd
    from {{ ref('int_cost_lines') }}
    group by workflow
),

outcomes as (
    select workflow, count(*) as outcomes, avg(total_usd) as avg_outcome_usd
    from {{ ref('cost_per_outcome') }}
    group by workflow
)

select
    c.workflow,
    c.runs,
    coalesce(o.outcomes, 0) as outcomes,
    c.first_at,
    c.last_at,
    c.llm_calls,
    c.model_calls,
    round(c.model_usd, 6) as model_usd,
    c.charges,
    round(c.fees_usd, 6) as fees_usd,
    round(c.model_usd + c.fees_usd, 6) as total_usd,
    round(o.avg_outcome_usd, 6) as avg_outcome_usd
from costs as c
left join outcomes as o on o.workflow = c.workflow
