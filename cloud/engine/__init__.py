"""The cloud's batching engine: a paged KV pool (kv_pool) with every session's block tables in slot-indexed arrays
(slots), a fair per-tick scheduler with a steady-state plan (scheduler), one batched pass over the deep layers per
tick (runner) with its static decode step (graphs) and the mixed pass of decode rows and prompt chunks (mixed), the
device lane of overlapped ticks (lane), the engine thread that ties them together (engine) and its
Prometheus metrics (metrics)."""
