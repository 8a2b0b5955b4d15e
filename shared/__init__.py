"""What both services share: `wire` (the contract between them), `model` (the pure PyTorch model and
its loader) and `kernels` (compute kernels behind the model). `model` imports `wire` and
`kernels`; `wire` and `kernels` import neither. Nothing here imports a service or the tooling."""
