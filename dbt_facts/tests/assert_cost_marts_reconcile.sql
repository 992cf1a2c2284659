-- The cost marts add up: every dollar of model calls and providers' fees in the audit trail is
-- in cost_per_action, cost_per_run and cost_per_workflow once (each row is rounded to the
-- micro-dollar, hence the tolerance of one micro-dollar per row).
with audit_total as (
    select
        (select coalesce(sum(cost_usd), 0) from {{ ref('stg_llm_calls') }})
        + (select coalesce(sum(amount_usd), 0) from {{ ref('stg_effect_costs') }}) as usd
),

marts as (
    select 'cost_per_action' as mart, sum(total_usd) as usd, count(*) as row_count
    from {{ ref('cost_per_action') }}
    union all
    select 'cost_per_run', sum(total_usd), count(*) from {{ ref('cost_per_run') }}
    union all
    select 'cost_per_workflow', sum(total_usd), count(*) from {{ ref('cost_per_workflow') }}
)

select m.mart, m.usd as mart_usd, a.usd as audit_usd
from marts as m
cross join audit_total as a
where abs(coalesce(m.usd, 0) - a.usd) > 1e-6 * (m.row_count + 1)
