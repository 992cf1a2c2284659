-- Every approval the ledger says was approved or rejected has the decision row behind it, at
-- the same time, with the same verdict, bound to the same payload hash.
select a.approval_id, a.status, a.decided_at
from {{ ref('stg_approvals') }} as a
left join {{ ref('stg_approval_decisions') }} as d
    on d.approval_id = a.approval_id
    and d.decided_at = a.decided_at
    and d.decision = a.status
    and d.payload_hash = a.payload_hash
where a.status in ('approved', 'rejected')
  and d.approval_id is null
