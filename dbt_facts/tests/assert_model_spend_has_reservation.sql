-- Every cost a model call settled was reserved first (promise 3): in each Dagster run, what the
-- audit says the run's model calls cost is covered by the run's budget reservations in the
-- ledger (a settled one at what it settled, a reserved or abandoned one at its worst case).
-- Settlements are rounded to the micro-dollar, so each call may differ by half a micro-dollar.
-- Calls outside any run reserve under their process ('adhoc:<host:pid:token>'), which the
-- audit does not record, so only calls made in a run can be matched to their reservations.
with spend as (
    select
        run_id,
        sum(cost_usd) * 1e6 as audit_micros,
        count(*) as calls
    from {{ ref('stg_llm_calls') }}
    where used_model and run_id is not null
    group by run_id
),

covered as (
    select substr(run_budget, 5) as run_id, sum(committed_micros) as ledger_micros
    from {{ ref('stg_budget_reservations') }}
    group by substr(run_budget, 5)
)

select
    s.run_id,
    s.audit_micros,
    coalesce(c.ledger_micros, 0) as ledger_micros
from spend as s
left join covered as c on c.run_id = s.run_id
where s.audit_micros > coalesce(c.ledger_micros, 0) + s.calls
