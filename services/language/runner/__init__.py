"""Model runners: per-request state from step plans, persistent step buffers, paged attention,
CUDA graphs, the K/V pool, and the executors that run them in this process or on
tensor-parallel ranks.

May import `shared` only: it knows nothing of the engine that schedules it."""
