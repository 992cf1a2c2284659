-- What each Dagster run cost (model calls and providers' fees), and what its run budget still
-- holds in the ledger (reserved or abandoned: spend that may yet show up on a bill). Calls made
-- outside any run (the CLI, scripts) are summed in the one row whose run_id is null.
with lines as (
    select
        run_id,
        string_agg(distinct workflow, ', ' order by workflow) as workflow,
        string_agg(distinct partition_key, ', ' order by partition_key) as partition_keys,
        count(distinct step) as steps,
        min(occurred_at) as started_at,
        max(occurred_at) as ended_at,
        sum(llm_calls) as llm_calls,
        sum(model_calls) as model_calls,
        sum(model_usd) as model_usd,
        sum(charges) as charges,
        sum(fees_usd) as fees_usd
    from {{ ref('int_cost_lines') }}
    group by run_id
),

run_budgets as (
    select period as run_id, reserved_micros + abandoned_micros as held_micros
    from {{ ref('stg_budget_totals') }}
    where kind = 'run'
)

select
    l.run_id,
    l.workflow,
    l.partition_keys,
    l.steps,
    l.started_at,
    l.ended_at,
    l.llm_calls,
    l.model_calls,
    round(l.model_usd, 6) as model_usd,
    l.charges,
    round(l.fees_usd, 6) as fees_usd,
    round(l.model_usd + l.fees_usd, 6) as total_usd,
    round(coalesce(b.held_micros, 0) / 1e6, 6) as held_usd
from lines as l
left join run_budgets as b on b.run_id = l.run_id
