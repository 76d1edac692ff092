"""`python -m cloud.healthcheck HOST:PORT`: exit 0 when the server's grpc.health.v1 status is SERVING, else 1.
The docker-compose health check and the tests use this same command."""

from __future__ import annotations

import sys

from cloud.launch import wait_healthy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    address = argv[0] if argv else "127.0.0.1:50151"
    try:
        wait_healthy(address, timeout_s=float(argv[1]) if len(argv) > 1 else 3.0)
    except (TimeoutError, RuntimeError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{address} SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
