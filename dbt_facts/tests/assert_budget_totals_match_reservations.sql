-- Every micro-dollar a budget holds has reservations behind it: each scope's running totals in
-- the ledger (settled, reserved, abandoned) equal the sums of the reservation rows that name
-- the scope. A settled cost without a reservation, or a reservation the totals missed, fails.
with from_rows as (
    select
        budget,
        sum(case when state = 'settled' then settled_micros else 0 end) as settled_micros,
        sum(case when state = 'reserved' then reserved_micros else 0 end) as reserved_micros,
        sum(case when state = 'abandoned' then reserved_micros else 0 end) as abandoned_micros
    from (
        select run_budget as budget, state, reserved_micros, settled_micros
        from {{ ref('stg_budget_reservations') }}
        union all
        select day_budget, state, reserved_micros, settled_micros
        from {{ ref('stg_budget_reservations') }}
        union all
        select month_budget, state, reserved_micros, settled_micros
        from {{ ref('stg_budget_reservations') }}
    ) as scoped
    group by budget
)

select
    coalesce(t.budget, r.budget) as budget,
    t.settled_micros as totals_settled,
    r.settled_micros as rows_settled,
    t.reserved_micros as totals_reserved,
    r.reserved_micros as rows_reserved,
    t.abandoned_micros as totals_abandoned,
    r.abandoned_micros as rows_abandoned
from {{ ref('stg_budget_totals') }} as t
full outer join from_rows as r on r.budget = t.budget
where coalesce(t.settled_micros, 0) <> coalesce(r.settled_micros, 0)
   or coalesce(t.reserved_micros, 0) <> coalesce(r.reserved_micros, 0)
   or coalesce(t.abandoned_micros, 0) <> coalesce(r.abandoned_micros, 0)
