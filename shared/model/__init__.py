"""The pure PyTorch Qwen3-VL-MoE: configs, the vision tower, the unified text model with optional
deepstack input, layers, checkpoint loading (sharded for tensor parallelism) and image
processing. May import `shared.wire` (the packed layout) and `shared.kernels`."""
