-- Every budget scope's running totals: 'run:<run id>', 'day:<YYYY-MM-DD>:<workflow>',
-- 'month:<YYYY-MM>'; `period` is the run id, the UTC day or the month.
select
    scope as budget,
    kind,
    workflow,
    case kind
        when 'day' then split_part(scope, ':', 2)
        else substr(scope, length(kind) + 2)
    end as period,
    settled_micros,
    reserved_micros,
    abandoned_micros,
    settled_micros + reserved_micros + abandoned_micros as committed_micros,
    updated_at
from {{ source('ledger', 'budget_totals') }}
