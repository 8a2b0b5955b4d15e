"""Compute kernels behind the model and the engine, one interface per operation.

Each operation has a PyTorch reference (`*_torch`), the implementation every other one is
tested against, and faster implementations where a device has them: a C++/OpenMP extension
for CPUs (`shared.kernels.cpu`, compiled once per machine) and Triton kernels for CUDA
(`shared.kernels.gpu`). `select` picks per device; `SPLITVL_KERNELS=torch` forces the
references everywhere.
"""
