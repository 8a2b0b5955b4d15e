"""Model runners: per-request state from step plans, persistent step buffers, paged attention,
CUDA graphs, and the executors that run them in this process or on tensor-parallel ranks."""
