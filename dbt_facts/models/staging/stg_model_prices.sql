-- The price table in force at the snapshot, in US dollars per million tokens.
select model, input_per_million, output_per_million
from {{ source('ledger', 'model_prices') }}
