-- The rules tier is deterministic code: it uses no tokens and costs nothing.
select call_id, model, prompt_tokens, completion_tokens, cost_usd
from {{ ref('stg_llm_calls') }}
where not used_model
  and (cost_usd <> 0 or prompt_tokens <> 0 or completion_tokens <> 0)
