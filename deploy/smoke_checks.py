"""HTTP checks for deploy/smoke.sh against the running compose stack. Standard library only (runs with any python3).

    python3 deploy/smoke_checks.py service    --url http://127.0.0.1:18000 --image tests/assets/images/x.jpg
    python3 deploy/smoke_checks.py index      --url http://127.0.0.1:18000 --images a.jpg b.png --add
    python3 deploy/smoke_checks.py prometheus --url http://127.0.0.1:19090 --job aim
    python3 deploy/smoke_checks.py grafana    --url http://127.0.0.1:13000 --user admin --password admin

Each logs what it verified and exits 1 with the reason at the first failure (`index`: 3 when the service has no
index routes). Plumbing for smoke.sh, pure Python (tested without an engine in tests/deploy/test_smoke.py):

    python3 deploy/smoke_checks.py project                 # a compose project name of its own for this run
    python3 deploy/smoke_checks.py env --base IMG ... [--port-base N] [--prometheus-image IMG]   # the run's env file
    python3 deploy/smoke_checks.py port "127.0.0.1:49153"  # the host port out of `compose port` output
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import re
import secrets
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


# ----- run plumbing (no engine needed) -----

PROJECT_PREFIX = "aim-smoke"
# The stand-in's own name: never the official one, so a later real `docker compose up` cannot silently run it.
STANDIN_PROMETHEUS_IMAGE = "aim-stand-in/prometheus:debian-bookworm"
# host side of each published port, by the compose variable that sets it (docker-compose.yml)
PUBLISH_VARS = ("AIM_PUBLISH", "PROMETHEUS_PUBLISH", "GRAFANA_PUBLISH", "AIM_PIPELINE_PUBLISH")


def project_name(token: str | None = None) -> str:
    """A compose project of this run's own (containers, network, volumes), so two runs never share or remove each
    other's. Compose names: lower-case letters, digits, '-' and '_', starting with a letter or digit."""
    token = token if token is not None else secrets.token_hex(4)
    name = f"{PROJECT_PREFIX}-{token}".lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"not a valid compose project name: {name!r}")
    return name


def publish_env(port_base: int | None) -> dict[str, str]:
    """Host addresses for the published ports. Default: "127.0.0.1:" (compose's "127.0.0.1::8000"), an ephemeral
    port the engine picks, read back with `compose port`: two runs can never ask for the same one. A port base
    (SMOKE_PORT_BASE) gives fixed ports base, +1, +2, +3 instead, for a firewall that needs to know them."""
    if port_base is None:
        return {var: "127.0.0.1:" for var in PUBLISH_VARS}
    if not 1024 <= port_base <= 65535 - len(PUBLISH_VARS):
        raise ValueError(f"port base {port_base} is outside 1024..{65535 - len(PUBLISH_VARS)}")
    return {var: f"127.0.0.1:{port_base + i}" for i, var in enumerate(PUBLISH_VARS)}


def env_file(
    *,
    base_image: str,
    torch_source: str,
    torch_version: str,
    aim_image: str,
    port_base: int | None = None,
    prometheus_image: str | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """The run's --env-file. PROMETHEUS_IMAGE only when the stand-in runs: docker-compose.yml names the official
    image, and this file exists for this run only."""
    values = {
        "BASE_IMAGE": base_image,
        "TORCH_SOURCE": torch_source,
        "TORCH_VERSION": torch_version,
        "AIM_IMAGE": aim_image,
        **publish_env(port_base),
        "AIM_TORCH_THREADS": "1",
        "AIM_LOG_LEVEL": "info",
    }
    if prometheus_image:
        values["PROMETHEUS_IMAGE"] = prometheus_image
    values |= extra or {}
    for key, value in values.items():
        if "\n" in value or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise ValueError(f"cannot write {key}={value!r} to an env file")
    return "".join(f"{k}={v}\n" for k, v in values.items())


def host_port(compose_port_output: str) -> int:
    """`compose port SERVICE 8000` prints "127.0.0.1:49153" (or "[::1]:49153", or one line per address)."""
    for line in compose_port_output.strip().splitlines():
        match = re.fullmatch(r"\s*(?:\[[0-9a-fA-F:.]+\]|[0-9.]+|[\w.-]+)?:(\d{1,5})\s*", line)
        if match and 0 < int(match.group(1)) < 65536:
            return int(match.group(1))
    raise ValueError(f"no host port in `compose port` output {compose_port_output!r}")


def expected_label(image: Path) -> str:
    """tests/assets/fashion_mnist/<label>__test_<n>.png: the label is the file name's prefix."""
    label, sep, _ = image.name.partition("__")
    if not sep or not label:
        raise ValueError(f"{image.name}: not a <label>__<name> file, pass --expect-label")
    return label


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


def check_service(
    url: str, image: Path, classify: bool = True, label_image: Path | None = None, label: str | None = None
) -> None:
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
    # An image of what the served head was trained on (the bundled demo: Fashion-MNIST), so the answer can be
    # checked against its real label, not only for shape.
    shot = label_image or image
    want = label or expected_label(shot)
    shot_bytes = shot.read_bytes()
    shot_type = "image/png" if shot.suffix.lower() == ".png" else "image/jpeg"
    body, mp_type = _multipart({"top_k": "3"}, [("files", shot.name, shot_bytes, shot_type)])
    status, _, raw = _request(f"{url}/classify", body, {"Content-Type": mp_type})
    if status != 200:
        raise CheckFailed(f"POST /classify: HTTP {status}: {raw[:300]!r}")
    preds = json.loads(raw).get("predictions") or []
    if len(preds) != 1 or len(preds[0].get("indices", [])) != 3:
        raise CheckFailed(f"POST /classify: expected top-3 for one image, got {str(preds)[:300]}")
    probs = preds[0].get("probs", [])
    if not all(0.0 <= p <= 1.0 for p in probs) or probs != sorted(probs, reverse=True):
        raise CheckFailed(f"POST /classify: probabilities not in [0, 1] and descending: {probs}")
    labels = preds[0].get("labels") or []
    if not labels or labels[0] != want:
        raise CheckFailed(f"POST /classify {shot.name}: top-1 {labels[:1]} (probs {probs}), expected {want!r}")
    logger.info(
        "POST /classify (%s, top_k=3): 200, top-1 %r as labelled, classes %s, probs %s",
        shot.name,
        labels[0],
        labels,
        [round(p, 4) for p in probs],
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
    s.add_argument("--label-image", type=Path, default=None, help="image for /classify (default: --image)")
    s.add_argument("--expect-label", default=None, help="its label (default: the <label>__ file-name prefix)")
    sub.add_parser("project", help="print a compose project name of this run's own")
    e = sub.add_parser("env", help="print the run's compose env file")
    e.add_argument("--base", required=True)
    e.add_argument("--torch-source", required=True)
    e.add_argument("--torch-version", required=True)
    e.add_argument("--image", required=True)
    e.add_argument("--port-base", type=int, default=None)
    e.add_argument("--prometheus-image", default=None, help="the stand-in, when it is what runs")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more variable")
    pt = sub.add_parser("port", help="print the host port out of `compose port` output")
    pt.add_argument("output")
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
        if args.command == "project":
            sys.stdout.write(project_name() + "\n")
        elif args.command == "env":
            extra = dict(kv.split("=", 1) for kv in args.set)
            sys.stdout.write(
                env_file(
                    base_image=args.base,
                    torch_source=args.torch_source,
                    torch_version=args.torch_version,
                    aim_image=args.image,
                    port_base=args.port_base,
                    prometheus_image=args.prometheus_image,
                    extra=extra,
                )
            )
        elif args.command == "port":
            sys.stdout.write(f"{host_port(args.output)}\n")
        elif args.command == "service":
            check_service(
                args.url.rstrip("/"),
                args.image,
                classify=not args.no_classify,
                label_image=args.label_image,
                label=args.expect_label,
            )
        elif args.command == "index":
            return check_index(args.url.rstrip("/"), args.images, args.add)
        elif args.command == "prometheus":
            check_prometheus(args.url.rstrip("/"), args.job, args.timeout)
        else:
            check_grafana(args.url.rstrip("/"), args.user, args.password, args.timeout)
    except (CheckFailed, ValueError) as exc:
        logger.error("FAILED: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
