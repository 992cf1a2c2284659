-- What each action cost: one step of one run for one work item, with its model calls and the
-- providers' fees of the effects it performed (`effect_actions`, e.g. 'charge'), together.
select
    concat_ws(' | ', coalesce(run_id, '(no run)'), workflow, coalesce(partition_key, '-'), step)
        as action_id,
    run_id,
    workflow,
    partition_key,
    step,
    string_agg(distinct effect_action, ', ' order by effect_action) as effect_actions,
    min(occurred_at) as first_at,
    max(occurred_at) as last_at,
    sum(llm_calls) as llm_calls,
    sum(model_calls) as model_calls,
    round(sum(model_usd), 6) as model_usd,
    sum(charges) as charges,
    round(sum(fees_usd), 6) as fees_usd,
    round(sum(model_usd) + sum(fees_usd), 6) as total_usd
from {{ ref('int_cost_lines') }}
group by run_id, workflow, partition_key, step
