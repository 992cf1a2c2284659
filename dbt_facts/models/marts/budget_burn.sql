-- Every budget against its limit: each run, workflow-day and month scope in the ledger, what it
-- holds (settled, reserved, abandoned: all count against the limit) and the share burnt. The
-- limits are the operator's policy.budgets as they stood at the ledger snapshot (a workflow's
-- daily override wins over the default); a null limit is no ceiling.
with limits as (
    select
        t.budget,
        case
            when o.kind is not null then o.limit_usd
            else d.limit_usd
        end as limit_usd
    from {{ ref('stg_budget_totals') }} as t
    left join {{ ref('stg_budget_limits') }} as o
        on t.kind = 'day' and o.kind = 'day' and o.workflow = t.workflow
    left join {{ ref('stg_budget_limits') }} as d
        on d.kind = t.kind and d.workflow is null
)

select
    t.budget,
    t.kind,
    t.workflow,
    t.period,
    l.limit_usd,
    round(t.settled_micros / 1e6, 6) as settled_usd,
    round(t.reserved_micros / 1e6, 6) as reserved_usd,
    round(t.abandoned_micros / 1e6, 6) as abandoned_usd,
    round(t.committed_micros / 1e6, 6) as committed_usd,
    case
        when l.limit_usd is not null
            -- not greatest(null, 0): DuckDB's greatest skips nulls, and no limit is no ceiling
            then round(greatest(l.limit_usd - t.committed_micros / 1e6, 0), 6)
    end as left_usd,
    round(t.committed_micros / 1e6 / nullif(l.limit_usd, 0), 6) as burn_rate,
    coalesce(t.committed_micros / 1e6 > l.limit_usd, false) as over_limit,
    t.updated_at
from {{ ref('stg_budget_totals') }} as t
inner join limits as l on l.budget = t.budget
