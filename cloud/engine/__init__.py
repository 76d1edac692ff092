"""The cloud's batching engine: a paged KV pool (kv_pool), a fair per-tick scheduler (scheduler), one batched
pass over the deep layers per tick (runner), the engine thread that ties them together (engine) and its
Prometheus metrics (metrics)."""
