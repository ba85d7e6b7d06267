#!/usr/bin/env bash
# Build the images of EFCM (docker/Dockerfile: the `serving`, `serving-cpu` and `component` targets),
# tagged with the version of pyproject.toml, with docker or podman, whichever is present.
# serving-cpu is the predictor without torch (ONNX Runtime, INT8), for CPU-only nodes.
#
#   scripts/images.sh [options]
#     --local-base            build on a stand-in base made from Debian's own packages (debootstrap),
#                             for machines that reach no container registry; made once, then reused
#     --local-base-if-offline the upstream base if it is here or can be pulled, else the stand-in
#     --refresh-base          remake the stand-in base (with --local-base*)
#     --base IMAGE            another base (any Debian-family image with Python 3.11, venv and pip)
#     --registry R            tag as R/efcm-serving:TAG, R/efcm-serving-cpu:TAG and
#                             R/efcm-component:TAG (default: localhost)
#     --tag TAG               default: the version of pyproject.toml
#     --target T              serving, serving-cpu, component or all (default)
#     --ca-bundle FILE        a CA bundle pip trusts during the build (a build secret, never in a
#                             layer); default: $EFCM_BUILD_CA_BUNDLE, else $PIP_CERT, else none
#     --no-cache              rebuild every layer (once per dependency stage: component reuses the
#                             layers serving has just rebuilt)
#     --json FILE             also write what was built (tags, sizes, seconds) as JSON to FILE
#     --print-engine          print the engine it would use (installing it in CI) and build nothing
#
# The dependency layer is rebuilt only when pyproject.toml or constraints.txt change. With podman, the
# machine-specific settings come from docker/podman-containers.conf (through CONTAINERS_CONF, unless it
# is set already); the machine's /etc is never edited. On a machine with neither engine it says how to
# get one; in CI (root, CI set) it installs podman and runc with apt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

UPSTREAM_BASE=python:3.11.14-slim-bookworm
STAND_IN_BASE=localhost/efcm-base:bookworm
base_mode=upstream base=$UPSTREAM_BASE refresh_base=0 registry=localhost tag="" target=all
ca_bundle="${EFCM_BUILD_CA_BUNDLE:-${PIP_CERT:-}}" no_cache=() json_out="" print_engine=0

die() { echo "images.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --local-base) base_mode=stand-in ;;
        --local-base-if-offline) base_mode=auto ;;
        --refresh-base) refresh_base=1 ;;
        --base) base=${2:?--base needs an image}; base_mode=given; shift ;;
        --registry) registry=${2:?--registry needs a name}; shift ;;
        --tag) tag=${2:?--tag needs a tag}; shift ;;
        --target) target=${2:?--target needs serving, serving-cpu, component or all}; shift ;;
        --ca-bundle) ca_bundle=${2:?--ca-bundle needs a file}; shift ;;
        --no-cache) no_cache=(--no-cache) ;;
        --json) json_out=${2:?--json needs a file}; shift ;;
        --print-engine) print_engine=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case "$target" in
    all) targets=(serving component serving-cpu) ;;
    serving|serving-cpu|component) targets=("$target") ;;
    *) die "--target: serving, serving-cpu, component or all, got '$target'" ;;
esac
[ -z "$tag" ] && tag=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
[ "$tag" = latest ] && die "--tag latest: images are tagged with a version, never :latest"
if [ -n "$ca_bundle" ] && [ ! -s "$ca_bundle" ]; then die "--ca-bundle: no such file: $ca_bundle"; fi

in_ci_as_root() { [ -n "${CI:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {
    echo "images.sh: installing $* with apt (CI, root)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# -- the engine ----------------------------------------------------------------------------------
engine=${EFCM_CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    elif in_ci_as_root; then
        apt_install podman runc
        engine=podman
    else
        die "neither a running Docker engine nor podman is here. Install one:
  Debian/Ubuntu: sudo apt-get install podman runc   (no daemon needed)
  Docker Engine: https://docs.docker.com/engine/install/"
    fi
fi
if [ "$engine" = podman ]; then
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/docker/podman-containers.conf}"
    if ! command -v runc >/dev/null && grep -q '^runtime *= *"runc"' "$CONTAINERS_CONF"; then
        if in_ci_as_root; then apt_install runc
        else die "$CONTAINERS_CONF runs containers with runc, which is not installed (apt-get install runc)"; fi
    fi
fi
if [ "$print_engine" = 1 ]; then echo "$engine"; exit 0; fi
image_exists() { "$engine" image inspect "$1" >/dev/null 2>&1; }
image_bytes() { "$engine" image inspect --format '{{.Size}}' "$1"; }

# -- the base ------------------------------------------------------------------------------------
debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

base_made_s=null
make_stand_in_base() {
    if image_exists "$STAND_IN_BASE" && [ "$refresh_base" = 0 ]; then return; fi
    local started
    started=$(date +%s)
    command -v debootstrap >/dev/null || {
        if in_ci_as_root; then apt_install debootstrap
        else die "--local-base needs debootstrap (apt-get install debootstrap)"; fi
    }
    [ "$(id -u)" = 0 ] || die "--local-base: debootstrap must run as root"
    local rootfs mirror
    rootfs=$(mktemp -d)
    mirror=$(debian_mirror)
    echo "images.sh: making the stand-in base $STAND_IN_BASE from Debian bookworm ($mirror)" >&2
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$engine" import - "$STAND_IN_BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    base_made_s=$(($(date +%s) - started))
}

case "$base_mode" in
    stand-in) make_stand_in_base; base=$STAND_IN_BASE ;;
    auto)
        if image_exists "$UPSTREAM_BASE" || "$engine" pull -q "$UPSTREAM_BASE" >/dev/null 2>&1; then
            base=$UPSTREAM_BASE
        else
            echo "images.sh: $UPSTREAM_BASE cannot be pulled here: building on the stand-in base" >&2
            make_stand_in_base
            base=$STAND_IN_BASE
        fi ;;
esac
stand_in=false
if [ "$base" = "$STAND_IN_BASE" ]; then
    stand_in=true
    echo "images.sh: base $base is a STAND-IN made from Debian bookworm's packages" \
        "(Debian's Python 3.11), not the upstream $UPSTREAM_BASE" >&2
fi

# -- the images ----------------------------------------------------------------------------------
build_args=(--build-arg "BASE=$base" --label "org.opencontainers.image.version=$tag"
            --label "org.opencontainers.image.base.name=$base" -f docker/Dockerfile)
[ -n "$ca_bundle" ] && build_args+=(--secret "id=ca-bundle,src=$ca_bundle")
if [ "$engine" = podman ]; then
    build_args+=(--network host --layers)
else
    export DOCKER_BUILDKIT=1
    build_args+=(--network host)
fi

# The dependency stage of each target (docker/Dockerfile): with --no-cache, each is rebuilt once,
# and a later target on the same one reuses what the build before it has just made.
deps_stage() { if [ "$1" = serving-cpu ]; then echo runtime-cpu; else echo runtime; fi; }
rebuilt=" "

results=()
for t in "${targets[@]}"; do
    image="$registry/efcm-$t:$tag"
    echo "images.sh: building $image ($engine, target $t)" >&2
    cache=()
    if [ ${#no_cache[@]} -gt 0 ] && [[ "$rebuilt" != *" $(deps_stage "$t") "* ]]; then
        cache=("${no_cache[@]}")
        rebuilt+="$(deps_stage "$t") "
    fi
    start=$(date +%s.%N)
    "$engine" build "${build_args[@]}" "${cache[@]}" --target "$t" -t "$image" . >&2
    seconds=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" \
        "$start" "$(date +%s.%N)")
    bytes=$(image_bytes "$image")
    printf 'images.sh: %s  %s MB  built in %s s\n' "$image" "$((bytes / 1000000))" "$seconds"
    results+=("{\"target\": \"$t\", \"image\": \"$image\", \"bytes\": $bytes, \"build_s\": $seconds}")
done

# Images these tags no longer name (an older build) go; the layer cache stays.
"$engine" image prune -f >/dev/null 2>&1 || true

if [ -n "$json_out" ]; then
    joined=$(IFS=,; echo "${results[*]}")
    printf '{"engine": "%s", "base": "%s", "stand_in_base": %s, "base_made_s": %s, "images": [%s]}\n' \
        "$engine" "$base" "$stand_in" "$base_made_s" "$joined" >"$json_out"
fi
