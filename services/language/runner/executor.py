"""How the engine core runs step plans: the one interface between the core and model runners.

The core never touches a runner's attributes; it hands plans to an executor and gets the
logits of the sampling rows back. `LocalExecutor` runs one runner in this process; the
tensor-parallel executor drives one runner per rank behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.language.runner.step_plan import StepPlan


class Executor(Protocol):
    """Runs plans on the model; logits rows follow ``plan.sampling_ids``."""

    @property
    def device(self) -> torch.device:
        """Where the logits (and so the sampler's tensors) live."""
        ...

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits ``[len(plan.sampling_ids), V]``, or None when the plan computes nothing."""
        ...

    def death(self) -> str | None:
        """Why the executor can no longer run steps (a worker died), or None; never blocks, so
        health checks may call it while a step runs."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One model runner in the calling process."""

    def __init__(self, runner):
        self.runner = runner  # public for tools that inspect it (benchmarks), never the core

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        return self.runner.execute(plan)

    def death(self) -> str | None:
        return None

    def shutdown(self) -> None:
        return None
