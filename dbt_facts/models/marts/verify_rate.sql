-- How often the policy escalates a draft to the verify tier, per role and step: of the outputs
-- with a draft-tier call, the share that also had a verify-tier call, and what verifying cost.
-- Outputs of roles assigned straight to the verify tier were never drafted and are left out.
select
    workflow || ' | ' || step || ' | ' || role as role_step_id,
    workflow,
    step,
    role,
    count(*) as drafted_outputs,
    count(*) filter (where verified) as verified_outputs,
    round(count(*) filter (where verified) / count(*), 6) as verify_rate,
    round(coalesce(sum(verify_usd), 0), 6) as verify_usd
from {{ ref('int_role_outputs') }}
where drafted
group by workflow, step, role
