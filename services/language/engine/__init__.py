"""The language engine: scheduler, KV block manager, sampler and the step loop around them.

It runs step plans through an `Executor` (services.language.runner) and knows nothing of HTTP
or gRPC; the front ends call `AsyncEngine`.
"""

from services.language.engine.async_engine import (
    AsyncEngine,
    EngineStats,
    InvalidRequestError,
    QueueFullError,
)
from services.language.engine.build import build_engine_core
from services.language.engine.config import EngineConfig, EngineConfigError

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineStats",
    "InvalidRequestError",
    "QueueFullError",
    "build_engine_core",
]
