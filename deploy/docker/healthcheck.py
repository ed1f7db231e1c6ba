"""Container health: exit 0 when the service's /readyz answers 200, 1 otherwise (loading, draining, down).

Standard library only, so the image needs no curl or wget. The port follows AIM_PORT like the service itself.
Readiness rather than liveness on purpose: Docker and compose only have one health state, and `depends_on:
condition: service_healthy` must mean "the model is loaded and passed its self-check", not "the process is up".
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('AIM_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("AIM_HEALTHCHECK_TIMEOUT_S", "4"))) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 loading/draining) is a URLError
        sys.stderr.write(f"{url}: {exc}\n")  # shown by `docker inspect` under .State.Health.Log
        return 1


if __name__ == "__main__":
    sys.exit(main())
