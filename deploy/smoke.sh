#!/usr/bin/env bash
# deploy/smoke.sh: build the CPU image, start the compose stack, prove it works end to end, tear it down.
#
#   bash deploy/smoke.sh
#
# Steps: docker compose config (default, pipeline profile, GPU override) -> build the image (checked: non-root, no
# compilers, healthcheck) -> compose up -d -> wait for health -> POST a real image to /embed and /classify ->
# Prometheus scraped the service (up == 1 through its HTTP API) -> Grafana provisioning -> graceful stop (exit 0)
# -> compose down -v. The last lines say which parts ran for real and which were only checked statically.
#
# Machines without a container registry (ours: see shared/docs/DOCKER.md) get what cannot be pulled another way:
#   base image   SMOKE_BASE_IMAGE, else the name cached in deploy/.smoke/base-image, else python:3.11-slim (local
#                or pulled), else aim-local/debian-python:bookworm (SMOKE_LOCAL_BASE; local, or made with
#                debootstrap and imported; needs root). The name is cached, so later runs skip all of this.
#   Prometheus   the official image (local or pulled), else a stand-in built from Debian's prometheus package under
#                its own name (aim-stand-in/prometheus:debian-bookworm), handed to compose through this run's env
#                file (PROMETHEUS_IMAGE) only. Never the official tag: a later real `compose up` must not run it
#                (a stand-in left under the official tag by an older version of this script is untagged).
#   Grafana      the official image (local or pulled), else not started: its provisioning is checked statically.
#
# Knobs: SMOKE_TORCH_WHEEL (a torch CPU wheel to build with; default /opt/wheels/torch-<version>+cpu-*.whl if
# present, else PyTorch's CPU index), SMOKE_EXTRA_CA (CA bundle for pip in the build; default this machine's
# /etc/ssl/certs/ca-certificates.crt, "" for none), SMOKE_BUILD_CPUS (cap the build's CPU use, e.g. 1 on a shared
# machine), SMOKE_PORT_BASE (fixed host ports: service, +1 Prometheus, +2 Grafana, +3 pipeline service; default:
# ephemeral ports the engine picks, read back with `compose port`), SMOKE_PROJECT (compose project name; default
# aim-smoke-<random>, so concurrent runs never share containers, networks or volumes),
# SMOKE_PULL_TIMEOUT (s, default 60), SMOKE_PIPELINE=1 (also run `--profile pipeline`: pre-train -> export -> index
# -> serve; builds the pipeline image, a few more minutes), SMOKE_KEEP=1 (leave the stack up), PYTHON (for the
# HTTP checks; standard library only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
PROJECT=${SMOKE_PROJECT:-$("$PYTHON" deploy/smoke_checks.py project)}
PORT_BASE=${SMOKE_PORT_BASE:-}
GRAFANA_PORT_HOST=
PULL_TIMEOUT=${SMOKE_PULL_TIMEOUT:-60}
IMAGE=aim-stack:cpu
LOCAL_BASE=${SMOKE_LOCAL_BASE:-aim-local/debian-python:bookworm}
CACHE_DIR=$ROOT/deploy/.smoke
TEST_IMAGE=$ROOT/tests/assets/images/landscape_640x427.jpg
# /classify gets an image of what the bundled demo's head was trained on, and must name its real label.
LABEL_IMAGE=$ROOT/tests/assets/fashion_mnist/bag__test_00018.png
STANDIN_PROM_IMAGE=aim-stand-in/prometheus:debian-bookworm
# The official names, read from docker-compose.yml so there is one source of truth.
# shellcheck disable=SC2016  # the ${...} is compose syntax to match literally, not a shell expansion
PROM_IMAGE=$(sed -n 's/.*\${PROMETHEUS_IMAGE:-\([^}]*\)}.*/\1/p' docker-compose.yml | head -n1)
# shellcheck disable=SC2016
GRAFANA_IMAGE=$(sed -n 's/.*\${GRAFANA_IMAGE:-\([^}]*\)}.*/\1/p' docker-compose.yml | head -n1)
STANDIN_LABEL=org.aim-stack.standin

REAL=()    # what ran for real
STATIC=()  # what was only checked without running it
CREATED=() # files this run put in the build context, removed at exit
WORK=$(mktemp -d)
STACK_UP=0

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    log "FAILED: $*"
    exit 1
}

# ----- compose: the v2 plugin where present, else docker-compose v1 (1.29 understands this compose file) -----
if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE_CMD=(docker-compose)
else
    die "neither the docker compose plugin nor docker-compose is installed"
fi
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$WORK/smoke.env" -f docker-compose.yml "$@"; }

on_exit() {
    local status=$?
    if [[ $STACK_UP == 1 ]]; then
        if [[ $status != 0 ]]; then
            log "logs of the stack (last 60 lines each):"
            compose logs --no-color --tail 60 || true
        fi
        if [[ ${SMOKE_KEEP:-0} == 1 ]]; then
            log "SMOKE_KEEP=1: stack left running; stop it with: ${COMPOSE_CMD[*]} -p $PROJECT down -v"
        else
            compose --profile pipeline down -v --remove-orphans >/dev/null 2>&1 || log "compose down -v failed"
        fi
    fi
    for f in "${CREATED[@]}"; do rm -f "$f"; done
    rm -rf "$WORK"
    exit "$status"
}
trap on_exit EXIT

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
log "engine $(docker version -f '{{.Server.Version}}'), compose: $("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?') (${COMPOSE_CMD[*]})"

# ----- base image -----
debootstrap_base() {
    # DOCKER.md step 2: Debian bookworm minbase + python3 from the mirror apt already uses, imported as an image.
    command -v debootstrap >/dev/null 2>&1 || die "no base image available and debootstrap is not installed"
    [[ $(id -u) == 0 ]] || die "no base image available and debootstrap needs root"
    local mirror rootfs
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$WORK/rootfs
    log "debootstrap bookworm from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
        tail -20 "$WORK/debootstrap.log"
        die "debootstrap failed"
    }
    tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    REAL+=("base image: built with debootstrap and imported as $LOCAL_BASE")
}

image_present() { docker image inspect "$1" >/dev/null 2>&1; }
try_pull() { timeout "$PULL_TIMEOUT" docker pull "$1" >/dev/null 2>&1; }

mkdir -p "$CACHE_DIR"
if [[ -n ${SMOKE_BASE_IMAGE:-} ]]; then
    BASE=$SMOKE_BASE_IMAGE
elif [[ -s $CACHE_DIR/base-image ]] && image_present "$(cat "$CACHE_DIR/base-image")"; then
    BASE=$(cat "$CACHE_DIR/base-image")
    log "base image $BASE (cached in deploy/.smoke/base-image)"
elif image_present python:3.11-slim || try_pull python:3.11-slim; then
    BASE=python:3.11-slim
elif image_present "$LOCAL_BASE"; then
    BASE=$LOCAL_BASE
else
    debootstrap_base
    BASE=$LOCAL_BASE
fi
echo "$BASE" >"$CACHE_DIR/base-image"
log "base image: $BASE"

# ----- build inputs: torch wheel and CA, only for this build -----
TORCH_SOURCE=https://download.pytorch.org/whl/cpu
wheel=${SMOKE_TORCH_WHEEL:-$(compgen -G "/opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl" | head -n1 || true)}
if [[ -n $wheel && -f $wheel ]]; then
    target=deploy/wheels/$(basename "$wheel")
    if [[ ! -f $target ]]; then
        cp "$wheel" "$target"
        CREATED+=("$ROOT/$target")
    fi
    TORCH_SOURCE=wheels
    log "torch: local wheel $(basename "$wheel") (TORCH_SOURCE=wheels)"
fi
extra_ca=${SMOKE_EXTRA_CA-/etc/ssl/certs/ca-certificates.crt}
if [[ -n $extra_ca && -s $extra_ca && ! -e deploy/certs/extra-ca.crt ]]; then
    cp "$extra_ca" deploy/certs/extra-ca.crt
    CREATED+=("$ROOT/deploy/certs/extra-ca.crt")
    log "pip in the build trusts $extra_ca (deploy/certs/extra-ca.crt, build stages only)"
fi

# The run's env file (written again once it is known which Prometheus image runs). Ports: ephemeral unless
# SMOKE_PORT_BASE is set; project: this run's own.
ENV_ARGS=(--base "$BASE" --torch-source "$TORCH_SOURCE" --torch-version "$TORCH_VERSION" --image "$IMAGE")
if [[ -n $PORT_BASE ]]; then ENV_ARGS+=(--port-base "$PORT_BASE"); fi
"$PYTHON" deploy/smoke_checks.py env "${ENV_ARGS[@]}" >"$WORK/smoke.env" || die "cannot write the env file"
log "compose project $PROJECT; host ports ${PORT_BASE:-ephemeral (read back with compose port)}"

# ----- compose files are valid, for every way in -----
compose config -q || die "docker-compose.yml does not validate"
compose --profile pipeline config -q || die "the pipeline profile does not validate"
"${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$WORK/smoke.env" -f docker-compose.yml -f docker-compose.gpu.yml \
    config -q || die "docker-compose.gpu.yml does not validate"
REAL+=("compose config: default, --profile pipeline, -f docker-compose.gpu.yml (${COMPOSE_CMD[*]})")

# ----- the image -----
build_flags=()
if [[ -n ${SMOKE_BUILD_CPUS:-} ]]; then
    build_flags+=(--cpu-period 100000 --cpu-quota "$((SMOKE_BUILD_CPUS * 100000))")
fi
log "docker build --target cpu -t $IMAGE (BASE_IMAGE=$BASE TORCH_SOURCE=$TORCH_SOURCE)"
start=$SECONDS
docker build "${build_flags[@]}" --target cpu -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SOURCE="$TORCH_SOURCE" --build-arg TORCH_VERSION="$TORCH_VERSION" \
    . >"$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log"
    die "docker build failed"
}
size_mb=$(($(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
log "built $IMAGE in $((SECONDS - start))s: ${size_mb} MB"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $user == 10001:10001 ]] || die "image runs as '$user', expected 10001:10001"
healthcheck=$(docker image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE")
[[ $healthcheck == *healthcheck.py* ]] || die "image has no HEALTHCHECK"
docker run --rm --entrypoint sh "$IMAGE" -c \
    'for t in gcc cc c++ g++ make ld; do if command -v "$t" >/dev/null; then echo "$t"; exit 1; fi; done' ||
    die "the final image has build tools"
REAL+=("image $IMAGE: built (${size_mb} MB on $BASE), user 10001, HEALTHCHECK on /readyz, no compilers")

# ----- Prometheus and Grafana images -----
is_standin() { [[ -n $(docker image inspect -f "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null) ]]; }
if image_present "$PROM_IMAGE" && is_standin "$PROM_IMAGE"; then
    # An older smoke.sh tagged its stand-in with the official name: move it to its own name, so compose, in this
    # run and every later one, never takes it for the official image.
    log "untagging $PROM_IMAGE: it is a stand-in left by an older smoke run, not the official image"
    docker image tag "$PROM_IMAGE" "$STANDIN_PROM_IMAGE" >/dev/null 2>&1 || true
    docker image rm "$PROM_IMAGE" >/dev/null || die "cannot untag the stand-in left as $PROM_IMAGE"
fi
PROM_RUN_IMAGE=$PROM_IMAGE
if image_present "$PROM_IMAGE"; then
    PROM_KIND="official image $PROM_IMAGE"
elif try_pull "$PROM_IMAGE"; then
    PROM_KIND="official image $PROM_IMAGE (pulled)"
else
    log "no official $PROM_IMAGE here: building (or reusing) the stand-in $STANDIN_PROM_IMAGE from Debian's package"
    docker build "${build_flags[@]}" --build-arg BASE_IMAGE="$BASE" --label "$STANDIN_LABEL=debian-prometheus" \
        -t "$STANDIN_PROM_IMAGE" deploy/prometheus/standin >"$WORK/prometheus-build.log" 2>&1 || {
        tail -30 "$WORK/prometheus-build.log"
        die "stand-in Prometheus build failed"
    }
    PROM_RUN_IMAGE=$STANDIN_PROM_IMAGE
    PROM_KIND="stand-in $STANDIN_PROM_IMAGE (Debian's prometheus package; compose gets it from this run's env file)"
    "$PYTHON" deploy/smoke_checks.py env "${ENV_ARGS[@]}" --prometheus-image "$STANDIN_PROM_IMAGE" \
        >"$WORK/smoke.env" || die "cannot write the env file"
fi
docker run --rm -v "$ROOT/deploy/prometheus:/etc/prometheus:ro" --entrypoint promtool "$PROM_RUN_IMAGE" \
    check config /etc/prometheus/prometheus.yml >"$WORK/promtool.log" 2>&1 || {
    cat "$WORK/promtool.log"
    die "promtool rejects deploy/prometheus/"
}
REAL+=("promtool check config: deploy/prometheus/prometheus.yml and its alerting rules ($PROM_KIND)")
docker run --rm -v "$ROOT/deploy/prometheus:/etc/prometheus:ro" -w /etc/prometheus/tests --entrypoint promtool \
    "$PROM_RUN_IMAGE" test rules aim.test.yml >"$WORK/promtool-test.log" 2>&1 || {
    cat "$WORK/promtool-test.log"
    die "promtool rule unit tests fail (deploy/prometheus/tests/aim.test.yml)"
}
REAL+=("promtool test rules: deploy/prometheus/tests/aim.test.yml (AimDown, AimAbsent under DNS discovery)")

services=(aim prometheus)
if image_present "$GRAFANA_IMAGE" || try_pull "$GRAFANA_IMAGE"; then
    services+=(grafana)
    GRAFANA_REAL=1
else
    GRAFANA_REAL=0
    log "$GRAFANA_IMAGE cannot be pulled here: Grafana is not started, its provisioning is checked statically"
fi

# ----- the stack -----
log "compose up -d ${services[*]}"
STACK_UP=1
compose up -d --no-build "${services[@]}" >"$WORK/up.log" 2>&1 || {
    cat "$WORK/up.log"
    die "compose up failed"
}

wait_healthy() {
    local service=$1 timeout=$2 cid status deadline=$((SECONDS + $2))
    cid=$(compose --profile pipeline ps -q "$service")
    [[ -n $cid ]] || die "no container for $service"
    while ((SECONDS < deadline)); do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$cid")
        [[ $status == healthy ]] && return 0
        [[ $status == unhealthy || $status == exited ]] && die "$service is $status"
        sleep 2
    done
    die "$service not healthy after ${timeout}s (last: $status)"
}
start=$SECONDS
for s in "${services[@]}"; do wait_healthy "$s" 300; done
REAL+=("compose up: ${services[*]} healthy after $((SECONDS - start))s (depends_on: service_healthy)")

# The host ports this run got (ephemeral unless SMOKE_PORT_BASE): asked of compose, not assumed.
published_port() {
    local out
    out=$(compose --profile pipeline port "$1" "$2" 2>/dev/null) || die "compose port $1 $2 failed"
    "$PYTHON" deploy/smoke_checks.py port "$out" || die "no host port for $1:$2 in '$out'"
}
AIM_PORT_HOST=$(published_port aim 8000)
PROM_PORT_HOST=$(published_port prometheus 9090)
if [[ $GRAFANA_REAL == 1 ]]; then GRAFANA_PORT_HOST=$(published_port grafana 3000); fi
log "published: aim 127.0.0.1:$AIM_PORT_HOST, prometheus 127.0.0.1:$PROM_PORT_HOST${GRAFANA_PORT_HOST:+, grafana 127.0.0.1:$GRAFANA_PORT_HOST}"

log "service checks (http://127.0.0.1:$AIM_PORT_HOST)"
"$PYTHON" deploy/smoke_checks.py service --url "http://127.0.0.1:$AIM_PORT_HOST" --image "$TEST_IMAGE" \
    --label-image "$LABEL_IMAGE" || die "service checks"
threads=$("$PYTHON" -c 'import json,sys,urllib.request as u; print(json.load(u.urlopen(sys.argv[1]))["settings"]["torch_threads"])' \
    "http://127.0.0.1:$AIM_PORT_HOST/info")
[[ $threads == 1 ]] || die "AIM_TORCH_THREADS from the env file did not reach the service (torch_threads=$threads)"
REAL+=("service: POST $(basename "$TEST_IMAGE") to /embed (multipart + base64 JSON), $(basename "$LABEL_IMAGE") to /classify (top-1 is its real label), /metrics counts them; AIM_* env passes through")

log "index checks: add three images to the index volume, search with one"
set +e
"$PYTHON" deploy/smoke_checks.py index --url "http://127.0.0.1:$AIM_PORT_HOST" --add \
    --images "$TEST_IMAGE" tests/assets/images/portrait_427x640.jpg tests/assets/images/palette_320x240.png
status=$?
set -e
case $status in
    0) REAL+=("index: POST /index/items (3 images) then POST /search finds the query image first (index on the index volume)") ;;
    3) STATIC+=("index routes: not in this build of the service (404), so not exercised") ;;
    *) die "index checks" ;;
esac

log "Prometheus checks (http://127.0.0.1:$PROM_PORT_HOST)"
"$PYTHON" deploy/smoke_checks.py prometheus --url "http://127.0.0.1:$PROM_PORT_HOST" --job aim || die "Prometheus checks"
REAL+=("Prometheus ($PROM_KIND): up{job=\"aim\"} == 1 and the service's counters via the HTTP API, alert rules loaded")

if [[ $GRAFANA_REAL == 1 ]]; then
    log "Grafana checks (http://127.0.0.1:$GRAFANA_PORT_HOST)"
    "$PYTHON" deploy/smoke_checks.py grafana --url "http://127.0.0.1:$GRAFANA_PORT_HOST" || die "Grafana checks"
    REAL+=("Grafana ($GRAFANA_IMAGE): data source and dashboard provisioned, queries reach Prometheus")
fi
# Static check always (also where Grafana runs): inside the image just built, against the metric names it exports.
docker run --rm -v "$ROOT/deploy/grafana:/grafana:ro" --entrypoint python "$IMAGE" \
    /grafana/check_provisioning.py /grafana || die "Grafana provisioning check"
STATIC+=("Grafana provisioning: data source -> http://prometheus:9090, dashboard JSON parses, every panel's PromQL uses metrics the built image exports")
if [[ $GRAFANA_REAL == 0 ]]; then
    STATIC+=("Grafana itself NOT run: $GRAFANA_IMAGE cannot be pulled here and has no Debian package")
fi

# ----- optional: the pipeline profile (pre-train -> export -> build index -> serve), SMOKE_PIPELINE=1 -----
if [[ ${SMOKE_PIPELINE:-0} == 1 ]]; then
    printf 'PIPELINE_STEPS=%s\n' "${SMOKE_PIPELINE_STEPS:-30}" >>"$WORK/smoke.env"
    log "docker build --target pipeline -t aim-stack:pipeline"
    docker build "${build_flags[@]}" --target pipeline -t aim-stack:pipeline \
        --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SOURCE="$TORCH_SOURCE" --build-arg TORCH_VERSION="$TORCH_VERSION" \
        . >"$WORK/build-pipeline.log" 2>&1 || {
        tail -40 "$WORK/build-pipeline.log"
        die "pipeline image build failed"
    }
    log "compose --profile pipeline up -d aim-pipeline (pretrain -> export -> build-index -> serve)"
    start=$SECONDS
    compose --profile pipeline up -d --no-build aim-pipeline >"$WORK/up-pipeline.log" 2>&1 || {
        cat "$WORK/up-pipeline.log"
        for job in pretrain export build-index; do compose --profile pipeline logs --no-color --tail 30 "$job" || true; done
        die "pipeline profile failed"
    }
    wait_healthy aim-pipeline 300
    PIPELINE_PORT_HOST=$(published_port aim-pipeline 8000)
    for job in pretrain export build-index; do
        code=$(docker inspect -f '{{.State.ExitCode}}' "$(compose --profile pipeline ps -q "$job")")
        [[ $code == 0 ]] || die "pipeline job $job exited with $code"
    done
    "$PYTHON" deploy/smoke_checks.py service --url "http://127.0.0.1:$PIPELINE_PORT_HOST" --image "$TEST_IMAGE" \
        --no-classify || die "pipeline service checks"
    set +e
    "$PYTHON" deploy/smoke_checks.py index --url "http://127.0.0.1:$PIPELINE_PORT_HOST" --images "$TEST_IMAGE"
    status=$?
    set -e
    [[ $status == 0 || $status == 3 ]] || die "pipeline index checks"
    "$PYTHON" deploy/smoke_checks.py prometheus --url "http://127.0.0.1:$PROM_PORT_HOST" --job aim-pipeline ||
        die "Prometheus did not scrape the pipeline's service"
    REAL+=("pipeline profile: pretrain, export (ONNX), build-index exited 0; aim-pipeline serves the export ($([[ $status == 0 ]] && echo '/embed + /search over the built index' || echo '/embed')), scraped as job aim-pipeline, in $((SECONDS - start))s")
fi

# ----- graceful stop: SIGTERM drains and exits 0 within stop_grace_period -----
cid=$(compose ps -q aim)
start=$SECONDS
compose stop -t 40 aim >/dev/null 2>&1
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
[[ $code == 0 ]] || die "the service exited with $code on SIGTERM"
# Into a file first: `docker logs | grep -q` fails under pipefail when grep exits early (SIGPIPE).
docker logs "$cid" >"$WORK/aim.log" 2>&1
grep -q draining "$WORK/aim.log" || die "no drain logged on SIGTERM"
REAL+=("graceful stop: SIGTERM -> /readyz 503 drain -> exit 0 in $((SECONDS - start))s")

if [[ ${SMOKE_KEEP:-0} != 1 ]]; then
    compose --profile pipeline down -v --remove-orphans >/dev/null 2>&1
    STACK_UP=0
    left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [[ -z $left ]] || die "volumes left after down -v: $left"
    REAL+=("compose down -v: containers, network and volumes removed")
fi

STATIC+=("GPU override (docker-compose.gpu.yml): compose config only; no NVIDIA runtime to run it")
echo
log "PASSED"
for line in "${REAL[@]}"; do echo "  REAL    $line"; done
for line in "${STATIC[@]}"; do echo "  STATIC  $line"; done
