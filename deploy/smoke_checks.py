"""HTTP checks for deploy/smoke.sh against the running compose stack. Standard library only (runs with any python3).

    python3 deploy/smoke_checks.py service    --url http://127.0.0.1:18000 --image tests/assets/images/x.jpg
    python3 deploy/smoke_checks.py index      --url http://127.0.0.1:18000 --images a.jpg b.png --add
    python3 deploy/smoke_checks.py prometheus --url http://127.0.0.1:19090 --job aim
    python3 deploy/smoke_checks.py grafana    --url http://127.0.0.1:13000 --user admin --password admin

Each logs what it verified and exits 1 with the reason at the first failure (`index`: 3 when the service has no
index routes).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger("smoke")


class CheckFailed(Exception):
    pass


def _request(
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:  # a 4xx/5xx is an answer to report, not a transport failure
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _json(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    status, _, body = _request(url, data, headers)
    if status != 200:
        raise CheckFailed(f"{url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def _multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content, ctype in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        )
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def check_service(url: str, image: Path, classify: bool = True) -> None:
    content = image.read_bytes()
    ctype = "image/png" if image.suffix.lower() == ".png" else "image/jpeg"

    body, mp_type = _multipart({}, [("files", image.name, content, ctype)])
    status, headers, raw = _request(f"{url}/embed", body, {"Content-Type": mp_type})
    if status != 200:
        raise CheckFailed(f"POST /embed (multipart): HTTP {status}: {raw[:300]!r}")
    result = json.loads(raw)
    vectors = result.get("embeddings") or []
    if len(vectors) != 1 or not vectors[0] or not all(math.isfinite(v) for v in vectors[0]):
        raise CheckFailed(f"POST /embed: expected one finite vector, got {str(result)[:300]}")
    norm = math.sqrt(sum(v * v for v in vectors[0]))
    logger.info(
        "POST /embed (multipart, %s, %d bytes): 200, one %d-d vector, L2 norm %.4f, model %s on %s, x-total-ms %s",
        image.name,
        len(content),
        len(vectors[0]),
        norm,
        result.get("recipe", {}).get("model_id"),
        result.get("recipe", {}).get("backend"),
        headers.get("x-total-ms"),
    )

    # The JSON base64 form of the same image must give the same vector (same decode path, same model).
    payload = json.dumps({"images": [base64.b64encode(content).decode()]}).encode()
    again = _json(f"{url}/embed", payload, {"Content-Type": "application/json"})["embeddings"][0]
    drift = max(abs(a - b) for a, b in zip(vectors[0], again, strict=True))
    if drift > 1e-5:
        raise CheckFailed(f"POST /embed: base64 JSON and multipart disagree by {drift}")
    logger.info("POST /embed (JSON base64): 200, same vector (max abs diff %.2e)", drift)

    if not classify:  # e.g. a pre-trained trunk: no head, /classify answers 409 no_head by design
        return
    body, mp_type = _multipart({"top_k": "3"}, [("files", image.name, content, ctype)])
    status, _, raw = _request(f"{url}/classify", body, {"Content-Type": mp_type})
    if status != 200:
        raise CheckFailed(f"POST /classify: HTTP {status}: {raw[:300]!r}")
    preds = json.loads(raw).get("predictions") or []
    if len(preds) != 1 or len(preds[0].get("indices", [])) != 3:
        raise CheckFailed(f"POST /classify: expected top-3 for one image, got {str(preds)[:300]}")
    probs = preds[0].get("probs", [])
    if not all(0.0 <= p <= 1.0 for p in probs) or probs != sorted(probs, reverse=True):
        raise CheckFailed(f"POST /classify: probabilities not in [0, 1] and descending: {probs}")
    logger.info(
        "POST /classify (top_k=3): 200, classes %s, probs %s", preds[0]["indices"], [round(p, 4) for p in probs]
    )

    status, _, raw = _request(f"{url}/metrics")
    text = raw.decode()
    if status != 200 or 'aim_requests_total{endpoint="/embed",status="200"}' not in text:
        raise CheckFailed("GET /metrics: no aim_requests_total sample for the /embed requests just made")
    logger.info("GET /metrics: 200, %d lines, the /embed and /classify requests are counted", text.count("\n"))


NOT_WIRED = 3  # exit status: the service answers 404 for the index routes (a build without them)


def check_index(url: str, images: list[Path], add: bool) -> int:
    """Optionally add the images to the index (ids = file names), then search with the first: it must rank first."""
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    headers = {"Content-Type": "application/json"}
    if add:
        payload = json.dumps({"ids": [p.name for p in images], "images": encoded}).encode()
        status, _, raw = _request(f"{url}/index/items", payload, headers)
        if status == 404:
            logger.info("POST /index/items: 404, the index routes are not in this build")
            return NOT_WIRED
        if status != 200:
            raise CheckFailed(f"POST /index/items: HTTP {status}: {raw[:300]!r}")
        logger.info("POST /index/items: 200, %d images added (durable once acknowledged)", len(images))
    status, _, raw = _request(f"{url}/search", json.dumps({"images": encoded[:1], "k": 3}).encode(), headers)
    if status == 404:
        logger.info("POST /search: 404, the index routes are not in this build")
        return NOT_WIRED
    if status != 200:
        raise CheckFailed(f"POST /search: HTTP {status}: {raw[:300]!r}")
    hits = json.loads(raw)["results"][0]
    if not hits["ids"] or hits["ids"][0] != images[0].name:
        raise CheckFailed(f"POST /search with {images[0].name}: expected it first, got {hits}")
    info = _json(f"{url}/index")
    logger.info(
        "POST /search (%s, k=3): 200, itself first (score %.4f), then %s; GET /index: %s",
        images[0].name,
        hits["scores"][0],
        hits["ids"][1:],
        {k: info.get(k) for k in ("kind", "size", "dim") if k in info} or str(info)[:200],
    )
    return 0


def _prom_query(url: str, query: str) -> list[dict[str, Any]]:
    data = _json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    if data.get("status") != "success":
        raise CheckFailed(f"Prometheus query {query!r}: {data}")
    return data["data"]["result"]


def _poll(what: str, timeout: float, fn: Any) -> Any:
    """Call fn until it returns a truthy value; the last error (or falsy result) is the failure reason."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
            last = f"{what}: not yet: {value!r}"
        except (CheckFailed, OSError, ValueError) as exc:  # not up yet / connection refused
            last = f"{what}: {exc}"
        time.sleep(2)
    raise CheckFailed(f"{last} (gave up after {timeout:.0f}s)")


def check_prometheus(url: str, job: str, timeout: float) -> None:
    build = _poll("Prometheus build info", timeout, lambda: _json(f"{url}/api/v1/status/buildinfo"))["data"]
    logger.info("Prometheus %s answers at %s", build.get("version"), url)

    def all_up() -> list[dict[str, Any]]:
        result = _prom_query(url, f'up{{job="{job}"}}')
        return result if result and all(r["value"][1] == "1" for r in result) else []

    ups = _poll(f'up{{job="{job}"}} == 1', timeout, all_up)
    logger.info(
        'Prometheus HTTP API: up{job="%s"} == 1 for %d target(s): %s',
        job,
        len(ups),
        ", ".join(r["metric"].get("instance", "?") for r in ups),
    )

    def scraped_requests() -> float:
        result = _prom_query(url, f'sum(aim_requests_total{{job="{job}", endpoint="/embed"}})')
        return float(result[0]["value"][1]) if result else 0.0

    n = _poll("aim_requests_total scraped into Prometheus", timeout, scraped_requests)
    logger.info('Prometheus has the service\'s counters: sum(aim_requests_total{endpoint="/embed"}) = %g', n)

    groups = _json(f"{url}/api/v1/rules")["data"]["groups"]
    rules = [r["name"] for g in groups for r in g["rules"]]
    if not rules:
        raise CheckFailed("Prometheus loaded no alerting rules from deploy/prometheus/rules/")
    logger.info("Prometheus loaded %d alerting rules: %s", len(rules), ", ".join(rules))


def check_grafana(url: str, user: str, password: str, timeout: float) -> None:
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {"Authorization": auth}
    health = _poll("Grafana /api/health", timeout, lambda: _json(f"{url}/api/health"))
    logger.info("Grafana %s answers, database %s", health.get("version"), health.get("database"))
    ds = _json(f"{url}/api/datasources/uid/prometheus", headers=headers)
    logger.info("Grafana data source provisioned: %s (%s) -> %s", ds.get("name"), ds.get("type"), ds.get("url"))
    dash = _poll(
        "Grafana dashboard aim-service",
        timeout,
        lambda: _json(f"{url}/api/dashboards/uid/aim-service", headers=headers),
    )
    panels = dash["dashboard"].get("panels", [])
    logger.info("Grafana dashboard provisioned: %r with %d panels", dash["dashboard"].get("title"), len(panels))
    proxied = _json(f"{url}/api/datasources/proxy/uid/prometheus/api/v1/query?query=up", headers=headers)
    if proxied.get("status") != "success":
        raise CheckFailed(f"Grafana -> Prometheus query failed: {proxied}")
    logger.info(
        "Grafana reaches Prometheus through the data source (query `up`: %d series)", len(proxied["data"]["result"])
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("service")
    s.add_argument("--url", required=True)
    s.add_argument("--image", type=Path, required=True)
    s.add_argument("--no-classify", action="store_true", help="the model has no head")
    i = sub.add_parser("index")
    i.add_argument("--url", required=True)
    i.add_argument("--images", type=Path, nargs="+", required=True, help="the first is the query")
    i.add_argument("--add", action="store_true", help="add the images first (ids = file names)")
    p = sub.add_parser("prometheus")
    p.add_argument("--url", required=True)
    p.add_argument("--job", default="aim")
    p.add_argument("--timeout", type=float, default=120.0)
    g = sub.add_parser("grafana")
    g.add_argument("--url", required=True)
    g.add_argument("--user", default="admin")
    g.add_argument("--password", default="admin")
    g.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    try:
        if args.command == "service":
            check_service(args.url.rstrip("/"), args.image, classify=not args.no_classify)
        elif args.command == "index":
            return check_index(args.url.rstrip("/"), args.images, args.add)
        elif args.command == "prometheus":
            check_prometheus(args.url.rstrip("/"), args.job, args.timeout)
        else:
            check_grafana(args.url.rstrip("/"), args.user, args.password, args.timeout)
    except CheckFailed as exc:
        logger.error("FAILED: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
