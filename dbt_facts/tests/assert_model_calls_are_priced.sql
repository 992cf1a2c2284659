-- No cost without a model price: every call that went to a model names a model in the price
-- table (the gateway refuses an unpriced model before calling, so its cost is always known).
-- Rules-tier rows name 'rules/<role>', call no model and are checked by
-- assert_rules_tier_is_free instead.
select c.call_id, c.tier, c.model
from {{ ref('stg_llm_calls') }} as c
left join {{ ref('stg_model_prices') }} as p on p.model = c.model
where c.used_model and p.model is null
