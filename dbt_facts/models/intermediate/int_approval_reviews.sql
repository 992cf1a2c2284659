-- Every decision on an approval with how long it waited, and the operator's review time.
--
-- "Review time while active", simply: the wait from request to decision, capped at
-- `review_minutes_cap` minutes (dbt var, default 15). A decision taken within the cap is taken
-- to have been reviewed for all of its wait; a longer wait means the operator was away, and
-- only the cap is counted as their time. Override with --vars '{review_minutes_cap: 30}'.
-- A decision the policy took (actor 'policy:...', e.g. an expired deadline or an automatic
-- rollback) cost the operator no time: its review time is 0.
with decisions as (
    select
        d.decision_id,
        d.approval_id,
        a.workflow,
        a.partition_key,
        a.outcome_id,
        a.action,
        d.decision,
        d.actor,
        a.requested_at,
        d.decided_at,
        greatest(0, extract(epoch from (d.decided_at - a.requested_at)) / 60.0)
            as latency_minutes
    from {{ ref('stg_approval_decisions') }} as d
    inner join {{ ref('stg_approvals') }} as a on a.approval_id = d.approval_id
)

select
    *,
    case
        when actor like 'policy:%' then 0.0
        else least(latency_minutes, {{ var('review_minutes_cap') }})
    end as review_minutes
from decisions
