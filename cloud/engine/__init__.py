"""The cloud's batching engine: a paged KV pool (kv_pool) with every session's block tables in slot-indexed arrays
(slots), a fair per-tick scheduler with a steady-state plan (scheduler), one batched pass over the deep layers per
tick (runner) and its static decode step (graphs), the engine thread that ties them together (engine) and its
Prometheus metrics (metrics)."""
