"""`python -m deploy.healthcheck --url tcp://127.0.0.1:5555`: is the rollout server up and healthy?

Sends one StatusRequest (with the token from --token or GKD_TOKEN) and exits 0 if the server
answers healthy, 1 otherwise, with one line saying why: the contract of a Docker/Compose
HEALTHCHECK. Imports only what the ZeroMQ client needs.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy.healthcheck", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--url", default="tcp://127.0.0.1:5555", help="Rollout server URL (default tcp://127.0.0.1:5555)."
    )
    p.add_argument(
        "--token", default=os.environ.get("GKD_TOKEN"), help="Control-channel token (default: env GKD_TOKEN)."
    )
    p.add_argument("--timeout_s", type=float, default=5.0, help="Seconds to wait for the answer (default 5).")
    args = p.parse_args(argv)

    from shared.transport import connect

    try:
        client = connect(args.url, token=args.token, timeout_s=args.timeout_s)
        try:
            st = client.status(timeout_s=args.timeout_s)
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - any failure means "not healthy"; say which
        print(f"unhealthy: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if not st.healthy:
        print(f"unhealthy: server at {args.url} reports healthy=false", file=sys.stderr)
        return 1
    print(
        f"healthy: {args.url} serves {st.model} v{st.policy_version} ({st.dtype}, {st.sync_mode}); "
        f"served {st.served_requests} requests, {st.served_sequences} sequences"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
