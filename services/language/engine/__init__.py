"""The language engine: scheduler, KV block manager, sampler and the step loop around them.

It runs step plans through an `Executor` (services.language.runner) and knows nothing of HTTP
or gRPC; the front ends call `AsyncEngine`.
"""

from services.language.engine.async_engine import (
    AsyncEngine,
    EngineConfig,
    EngineConfigError,
    EngineStats,
    InvalidRequestError,
    QueueFullError,
    build_engine_core,
)

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineStats",
    "InvalidRequestError",
    "QueueFullError",
    "build_engine_core",
]
