-- How long the operator takes to decide approvals, per workflow and action: requests by
-- status as of the ledger snapshot, decisions, wait from request to decision (minutes), and
-- review time (each wait capped at var review_minutes_cap: see int_approval_reviews).
with requests as (
    select
        workflow,
        action,
        count(*) as requests,
        count(*) filter (where status = 'pending') as pending,
        count(*) filter (where status = 'superseded') as superseded
    from {{ ref('stg_approvals') }}
    group by workflow, action
),

decisions as (
    select
        workflow,
        action,
        count(*) as decisions,
        count(*) filter (where decision = 'approved') as approved,
        count(*) filter (where decision = 'rejected') as rejected,
        avg(latency_minutes) as avg_latency_minutes,
        median(latency_minutes) as median_latency_minutes,
        max(latency_minutes) as max_latency_minutes,
        sum(review_minutes) as review_minutes
    from {{ ref('int_approval_reviews') }}
    group by workflow, action
)

select
    r.workflow || ' | ' || r.action as workflow_action,
    r.workflow,
    r.action,
    r.requests,
    r.pending,
    r.superseded,
    coalesce(d.decisions, 0) as decisions,
    coalesce(d.approved, 0) as approved,
    coalesce(d.rejected, 0) as rejected,
    round(d.avg_latency_minutes, 4) as avg_latency_minutes,
    round(d.median_latency_minutes, 4) as median_latency_minutes,
    round(d.max_latency_minutes, 4) as max_latency_minutes,
    round(coalesce(d.review_minutes, 0), 4) as review_minutes
from requests as r
left join decisions as d on d.workflow = r.workflow and d.action = r.action
