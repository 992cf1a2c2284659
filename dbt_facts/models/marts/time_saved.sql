-- The operator's time each business outcome saved: for every agent role output made for the
-- work item (re-runs of the same step do not count twice), the minutes of manual work the role
-- declares it replaces (AgentRole.manual_minutes; 0 for an undeclared role, counted apart),
-- less the operator's review time on the item's approvals (each decision's wait capped at var
-- review_minutes_cap: see int_approval_reviews). Work without a partition key is no outcome.
with outputs as (
    select distinct workflow, partition_key, step, role
    from {{ ref('int_role_outputs') }}
    where produced and partition_key is not null
),

replaced as (
    select
        o.workflow,
        o.partition_key,
        count(*) as outputs,
        count(*) filter (where m.role is null) as undeclared_outputs,
        coalesce(sum(m.manual_minutes), 0) as manual_minutes
    from outputs as o
    left join {{ ref('stg_role_minutes') }} as m
        on m.workflow = o.workflow and m.role = o.role
    group by o.workflow, o.partition_key
),

reviews as (
    select workflow, partition_key, count(*) as decisions, sum(review_minutes) as review_minutes
    from {{ ref('int_approval_reviews') }}
    group by workflow, partition_key
),

outcomes as (
    select
        coalesce(r.workflow, v.workflow) as workflow,
        coalesce(r.partition_key, v.partition_key) as partition_key,
        coalesce(r.outputs, 0) as outputs,
        coalesce(r.undeclared_outputs, 0) as undeclared_outputs,
        coalesce(r.manual_minutes, 0) as manual_minutes,
        coalesce(v.decisions, 0) as decisions,
        coalesce(v.review_minutes, 0) as review_minutes
    from replaced as r
    full outer join reviews as v
        on v.workflow = r.workflow and v.partition_key = r.partition_key
)

select
    workflow || '/' || partition_key as outcome_id,
    workflow,
    partition_key,
    outputs,
    undeclared_outputs,
    round(manual_minutes, 4) as manual_minutes,
    decisions,
    round(review_minutes, 4) as review_minutes,
    round(manual_minutes - review_minutes, 4) as net_minutes_saved
from outcomes
