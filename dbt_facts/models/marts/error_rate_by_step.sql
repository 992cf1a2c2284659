-- How often each step's model calls fail (error_rate = failed_calls / model_calls; rules-tier
-- stand-ins call no model and cannot fail, so they are counted apart, as are fallbacks: outputs
-- the policy handed to the rules tier after the models failed or were unavailable).
with calls as (
    select
        workflow,
        step,
        count(*) filter (where used_model) as model_calls,
        count(*) filter (where used_model and status = 'error') as failed_calls,
        count(*) filter (where not used_model) as rules_calls
    from {{ ref('stg_llm_calls') }}
    group by workflow, step
),

fallbacks as (
    select workflow, step, count(*) as fallbacks
    from {{ ref('stg_audit_events') }}
    where kind = 'fallback'
    group by workflow, step
)

select
    c.workflow || ' | ' || c.step as step_id,
    c.workflow,
    c.step,
    c.model_calls,
    c.failed_calls,
    round(c.failed_calls / nullif(c.model_calls, 0), 6) as error_rate,
    c.rules_calls,
    coalesce(f.fallbacks, 0) as fallbacks
from calls as c
left join fallbacks as f on f.workflow = c.workflow and f.step = c.step
