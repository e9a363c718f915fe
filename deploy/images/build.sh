#!/usr/bin/env bash
# Build, name or push Cutout's three images (docs/images.md).
#
#   deploy/images/build.sh build [cpu|gpu|models ...]   build (default: all three)
#   deploy/images/build.sh push                         podman push all three
#   deploy/images/build.sh names                        print the three image references
#
# Environment:
#   IMAGE_REPO   registry/namespace to name the images in (default: localhost)
#   TAG          tag of cutout and cutout-gpu (default: the version in pyproject.toml)
#   MODELS_TAG   tag of cutout-models (default: the first 12 hex digits of a sha256
#                over the models' checksums, so it changes exactly when they do)
#   MODEL_DIR    folder of *.onnx baked into cutout-models (default: $CUTOUT_MODEL_DIR,
#                else ../shared/models beside the repository)
#   BASES        public: python:3.12-slim-bookworm, nvidia/cuda ...-cudnn-runtime, debian:bookworm-slim
#                local:  $LOCAL_BASE (made by setup-host.sh from Debian's packages) for all three
#                default: local when that image exists, else public
#   CPU_BASE, GPU_BASE, MODELS_BASE   override one base each
#   PUSH_FLAGS   extra `podman push` flags (e.g. --tls-verify=false for a plain-HTTP test registry)
#   PODMAN       the podman binary (build uses podman's -v and --layers; with docker, run the
#                `docker build` commands at the top of each Containerfile instead)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
podman="${PODMAN:-podman}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

repo="${IMAGE_REPO:-localhost}"
repo="${repo%/}"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)
tag="${TAG:-${version:-latest}}"
model_dir="${MODEL_DIR:-${CUTOUT_MODEL_DIR:-$root/../shared/models}}"
local_base="${LOCAL_BASE:-localhost/debian-python:bookworm}"

log() { printf 'images: %s\n' "$*" >&2; }

models_tag() {
    if [[ -n ${MODELS_TAG:-} ]]; then
        echo "$MODELS_TAG"
        return
    fi
    local sums
    sums=$(cd "$model_dir" && sha256sum -- *.onnx) || {
        log "no *.onnx in MODEL_DIR=$model_dir"
        exit 1
    }
    echo "$sums" | sha256sum | cut -c1-12
}

cpu_ref() { echo "$repo/cutout:$tag"; }
gpu_ref() { echo "$repo/cutout-gpu:$tag"; }
models_ref() { echo "$repo/cutout-models:$(models_tag)"; }

choose_bases() {
    local bases="${BASES:-}"
    if [[ -z $bases ]]; then
        if "$podman" image exists "$local_base" 2>/dev/null; then bases=local; else bases=public; fi
    fi
    case "$bases" in
    local)
        "$podman" image exists "$local_base" || {
            log "BASES=local but $local_base is missing: run deploy/images/setup-host.sh"
            exit 1
        }
        : "${CPU_BASE:=$local_base}" "${GPU_BASE:=$local_base}" "${MODELS_BASE:=$local_base}"
        ;;
    public)
        : "${CPU_BASE:=docker.io/library/python:3.12-slim-bookworm}"
        : "${GPU_BASE:=docker.io/nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04}"
        : "${MODELS_BASE:=docker.io/library/debian:bookworm-slim}"
        ;;
    *)
        log "BASES must be local or public, not $bases"
        exit 1
        ;;
    esac
    log "bases ($bases): cpu $CPU_BASE, gpu $GPU_BASE, models $MODELS_BASE"
}

# Pip inside the build reaches the package index the way this host's pip does:
# the index, extra indexes, find-links, constraints and CA bundle from
# `pip config list` (files and PIP_* variables) go into a pip.conf that is
# bind-mounted at /etc/pip.conf for the build only, with every local path it
# names mounted read-only at the same place (for a file:// index, the folder
# above it: its pages link to ../../files/). Nothing of it lands in an image.
pip_mounts=()
pip_conf=""
pip_passthrough() {
    local pip listing
    if [[ -x $root/.venv/bin/pip ]]; then
        pip=("$root/.venv/bin/pip")
    elif command -v pip3 >/dev/null; then
        pip=(pip3)
    else
        pip=(python3 -m pip)
    fi
    listing=$("${pip[@]}" config list 2>/dev/null) || listing=""
    pip_conf=$(mktemp /tmp/cutout-pip.XXXXXX.conf)
    local conf=$pip_conf
    chmod 644 "$conf"
    # Later lines win, and pip lists files before :env: (the environment wins in pip too).
    python3 -c '
import re, sys
keys = ("index-url", "extra-index-url", "find-links", "cert", "client-cert", "trusted-host",
        "constraint", "timeout", "default-timeout", "retries", "proxy", "no-index")
settings = {}
for line in sys.argv[2].splitlines():
    m = re.match(r"^[^.]*\.([a-z-]+)=\x27(.*)\x27$", line.strip())
    if m and m[1] in keys:
        settings[m[1]] = m[2]
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
' "$conf" "$listing"
    pip_mounts=(-v "$conf:/etc/pip.conf:ro")
    local word path
    # shellcheck disable=SC2013  # words: one setting may list several paths
    for word in $(sed -n 's/^[a-z-]* = //p' "$conf"); do
        path="${word#file://}"
        # A file:// index's pages link to files beside it (../../files/x.whl):
        # mount the folder above the index root.
        [[ $word == file://* ]] && path=$(dirname "${path%/}")
        if [[ $path == /* && -e $path ]]; then
            pip_mounts+=(-v "$path:$path:ro")
        fi
    done
    log "pip in the build: $(tr '\n' ' ' <"$conf")"
}

build_one() {
    local what=$1 start=$SECONDS
    local common=(build --network host --layers "${pip_mounts[@]}" --build-arg "VERSION=$tag")
    case "$what" in
    cpu)
        "$podman" "${common[@]}" -f "$here/Containerfile" --target cpu \
            --build-arg "BASE=$CPU_BASE" --build-arg EXTRAS=cpu -t "$(cpu_ref)" "$root"
        ;;
    gpu)
        "$podman" "${common[@]}" -f "$here/Containerfile" --target gpu \
            --build-arg "BASE=$GPU_BASE" --build-arg EXTRAS=gpu -t "$(gpu_ref)" "$root"
        ;;
    models)
        "$podman" "${common[@]}" -f "$here/Containerfile.models" \
            --build-context "models=$model_dir" --build-arg "BASE=$MODELS_BASE" \
            -t "$(models_ref)" "$here"
        ;;
    *)
        log "unknown image $what (cpu, gpu, models)"
        exit 1
        ;;
    esac
    log "$what built in $((SECONDS - start)) s"
}

# One function, parsed whole before it runs: editing this file during a
# build then cannot make bash read on from a shifted offset.
main() {
    local cmd="${1:-build}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
    names)
        printf '%s\n' "$(cpu_ref)" "$(gpu_ref)" "$(models_ref)"
        ;;
    build)
        choose_bases
        pip_passthrough
        trap 'rm -f "$pip_conf"' EXIT
        local start=$SECONDS targets what
        targets=("$@")
        ((${#targets[@]})) || targets=(cpu gpu models)
        for what in "${targets[@]}"; do
            build_one "$what"
        done
        log "built ${targets[*]} in $((SECONDS - start)) s"
        "$podman" image ls --filter "reference=$repo/cutout*" >&2
        ;;
    push)
        if [[ $repo == localhost ]]; then
            log "set IMAGE_REPO to the registry to push to (e.g. registry.example.org/team)"
            exit 1
        fi
        local ref
        for ref in "$(cpu_ref)" "$(gpu_ref)" "$(models_ref)"; do
            log "pushing $ref"
            # shellcheck disable=SC2086  # PUSH_FLAGS: words on purpose
            "$podman" push ${PUSH_FLAGS:-} "$ref"
        done
        ;;
    *)
        log "usage: build.sh build [cpu|gpu|models ...] | push | names"
        exit 1
        ;;
    esac
}

main "$@"
