"""Container health probe: gRPC health (`grpc.health.v1`) or HTTP GET /health; exit 0 when serving.

python deploy/healthcheck.py grpc HOST:PORT
python deploy/healthcheck.py http http://HOST:PORT/health
"""

from __future__ import annotations

import sys
import urllib.request


def grpc_serving(target: str, timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_serving(url: str, timeout: float = 3.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (fixed local URL)
        return reply.status == 200


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        ok = grpc_serving(argv[1]) if argv[0] == "grpc" else http_serving(argv[1])
    except Exception as e:  # any failure means not healthy
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
