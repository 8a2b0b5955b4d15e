"""Counting the kernel launches of a decode step without a GPU.

Every PyTorch op that would launch a kernel on a GPU is counted from the dispatcher (views,
reshapes and allocations launch none), and every Triton kernel launch from Triton's interpreter,
whose own tensor traffic is not counted. Launches are attributed to the decoder layer that made
them (forward hooks), so `per_layer` is what one layer costs at its depth; the CUDA selection is
counted with `SPLITVL_KERNELS=gpu TRITON_INTERPRET=1` (the Triton kernels on CPU tensors), the
CPU selection as the CPU runs it.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or only describe memory: no kernel on a GPU
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "lift_fresh", "alias"}


def launches_kernel(func) -> bool:
    """Whether an aten op launches a kernel on a GPU: views (outputs aliasing an input without
    writing it) and allocations do not."""
    if func.__name__.split(".")[0] in _NO_KERNEL:
        return False
    aliasing = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
    return not aliasing or any(info.is_write for info in aliasing)


class LaunchCounter(TorchDispatchMode):
    """Counts launches per decoder layer (None: outside every layer) and by kernel name."""

    def __init__(self) -> None:
        super().__init__()
        self.layer: int | None = None
        self.per_layer: Counter[int | None] = Counter()
        self.names: dict[int | None, Counter[str]] = {}
        self._in_triton = 0

    def record(self, name: str) -> None:
        self.per_layer[self.layer] += 1
        self.names.setdefault(self.layer, Counter())[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._in_triton and launches_kernel(func):
            self.record(func.__name__)
        return out

    @contextmanager
    def counting(self, model: torch.nn.Module):
        """Count inside the block, attributing to `model`'s decoder layers."""
        hooks = []
        for index, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_pre_hook(self._enter(index)))
            hooks.append(layer.register_forward_hook(self._leave))
        restore = self._patch_triton()
        try:
            with self:
                yield self
        finally:
            restore()
            for hook in hooks:
                hook.remove()

    def _enter(self, index: int):
        def hook(_module, _args):
            self.layer = index

        return hook

    def _leave(self, _module, _args, _output) -> None:
        self.layer = None

    def _patch_triton(self):
        """Count each interpreted Triton launch as one, and none of its own tensor ops."""
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # no Triton: nothing to count there
            return lambda: None
        run = InterpretedFunction.run
        counter = self

        def counted(fn, *args, **kwargs):
            counter.record(f"triton:{fn.fn.__name__}")
            counter._in_triton += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                counter._in_triton -= 1

        InterpretedFunction.run = counted

        def restore() -> None:
            InterpretedFunction.run = run

        return restore
