-- One row per output an agent role made: the calls of one role in one step of one run for one
-- work item (draft, repairs, verify, or the rules stand-in). A call outside any Dagster run has
-- nothing to group it with and counts as its own output.
select
    concat_ws(
        ' | ', workflow, coalesce(partition_key, '-'), coalesce(run_id, call_id), step, role
    ) as output_id,
    workflow,
    partition_key,
    coalesce(run_id, call_id) as run_or_call,
    step,
    role,
    count(*) as calls,
    bool_or(tier = 'draft') as drafted,
    bool_or(tier = 'verify') as verified,
    bool_or(status = 'ok') as produced,
    sum(cost_usd) filter (where tier = 'verify') as verify_usd,
    min(occurred_at) as started_at
from {{ ref('stg_llm_calls') }}
group by workflow, partition_key, coalesce(run_id, call_id), step, role
