-- What each business outcome cost: a work item of a workflow (a newsletter issue is workflow
-- 'newsletter' + its partition key; a customer ticket its own key), across every run that
-- worked on it, model calls and providers' fees together; and whether its irreversible action
-- was executed (an approved request was carried out). Work without a partition key is no
-- outcome: it is in cost_per_run and cost_per_workflow only.
with costs as (
    select
        workflow,
        partition_key,
        count(distinct run_id) as runs,
        min(occurred_at) as first_at,
        max(occurred_at) as last_at,
        sum(llm_calls) as llm_calls,
        sum(model_calls) as model_calls,
        sum(model_usd) as model_usd,
        sum(charges) as charges,
        sum(fees_usd) as fees_usd
    from {{ ref('int_cost_lines') }}
    where partition_key is not null
    group by workflow, partition_key
),

approvals as (
    select
        workflow,
        partition_key,
        count(*) as approval_requests,
        bool_or(executed) as executed
    from {{ ref('stg_approvals') }}
    group by workflow, partition_key
)

select
    c.workflow || '/' || c.partition_key as outcome_id,
    c.workflow,
    c.partition_key,
    c.runs,
    c.first_at,
    c.last_at,
    c.llm_calls,
    c.model_calls,
    round(c.model_usd, 6) as model_usd,
    c.charges,
    round(c.fees_usd, 6) as fees_usd,
    round(c.model_usd + c.fees_usd, 6) as total_usd,
    coalesce(a.approval_requests, 0) as approval_requests,
    coalesce(a.executed, false) as executed
from costs as c
left join approvals as a on a.workflow = c.workflow and a.partition_key = c.partition_key
