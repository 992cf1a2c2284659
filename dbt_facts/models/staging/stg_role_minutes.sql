-- Minutes of manual work one output of a declared agent role replaces.
select
    workflow || '/' || role as role_id,
    workflow,
    role,
    manual_minutes
from {{ source('ledger', 'role_minutes') }}
