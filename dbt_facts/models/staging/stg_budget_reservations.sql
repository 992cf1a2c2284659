-- Budget reservations with the three budgets each counts against and what it counts now:
-- a settled one its real cost, a reserved or abandoned one its worst case (it may still be
-- billed), a released one nothing.
select
    reservation_id,
    workflow,
    run_id,
    'run:' || run_scope as run_budget,
    'day:' || day_scope as day_budget,
    'month:' || month_scope as month_budget,
    purpose,
    purpose = 'lease' as is_lease,
    model,
    state,
    reserved_micros,
    settled_micros,
    case state
        when 'settled' then settled_micros
        when 'reserved' then reserved_micros
        when 'abandoned' then reserved_micros
        else 0
    end as committed_micros,
    reserved_micros / 1e6 as reserved_usd,
    settled_micros / 1e6 as settled_usd,
    created_at,
    updated_at
from {{ source('ledger', 'budget_reservations') }}
