#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host (run as root) to build and smoke-test Cutout's images
# without pulling anything from a container registry. Idempotent: every step is
# skipped when its result is already there.
#
#   1. podman, buildah, runc and friends from apt, when missing;
#   2. checks that a container runs with deploy/images/containers.conf;
#   3. the local stand-in base image localhost/debian-python:bookworm, made with
#      debootstrap from the host's own Debian mirror; the rootfs tarball is kept
#      in $CUTOUT_IMAGE_CACHE (default /var/cache/cutout) and re-imported from
#      there when the image is gone, so debootstrap runs once per machine.
#
# Production builds do not need step 3: they use the public bases (see
# docs/images.md). Environment: CUTOUT_IMAGE_CACHE, DEBIAN_MIRROR, LOCAL_BASE.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${CUTOUT_IMAGE_CACHE:-/var/cache/cutout}"
base="${LOCAL_BASE:-localhost/debian-python:bookworm}"
suite=bookworm
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

log() { printf 'setup-host: %s\n' "$*" >&2; }

if [[ $(id -u) != 0 ]]; then
    log "run as root (apt-get, debootstrap and rootful podman)"
    exit 1
fi

# --- 1. packages -------------------------------------------------------------
# command -> Debian package. runc: crun 1.8 cannot run containers on this
# machine kind ("cgroups in hybrid mode not supported"), see containers.conf.
declare -A packages=(
    [podman]=podman [buildah]=buildah [runc]=runc [debootstrap]=debootstrap
    [newuidmap]=uidmap [slirp4netns]=slirp4netns [fuse-overlayfs]=fuse-overlayfs
    [skopeo]=skopeo
)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    mkdir -p "$cache"
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"$cache/apt.log" 2>&1 || {
        tail -20 "$cache/apt.log" >&2
        exit 1
    }
fi

# --- 2. can we run a container at all? ------------------------------------------
# (checked on the base image below, once it exists)

# --- 3. the local base image ----------------------------------------------------
debian_mirror() {
    # The first Debian archive the host's apt uses (deb822 or one-line format).
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local url
    url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | awk '
            /^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }
            /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|file):/ && $i ~ /\/debian\/?$/) { print $i; exit } }
        ')
    echo "${url:-http://deb.debian.org/debian}"
}

make_rootfs_tarball() {
    local tarball=$1 rootfs
    rootfs=$(mktemp -d /var/tmp/cutout-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "umount '$rootfs/proc' 2>/dev/null || true; rm -rf '$rootfs'" RETURN
    local mirror
    mirror=$(debian_mirror)
    log "debootstrap --variant=minbase $suite from $mirror (about 80 s)"
    debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        tail -20 "$cache/debootstrap.log" >&2
        return 1
    }
    mount -t proc proc "$rootfs/proc"
    # What python:3.12-slim-bookworm has that matters to us: Python with venv,
    # and CA certificates for outgoing HTTPS (URL intake, Cloudinary).
    chroot "$rootfs" apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates >"$cache/chroot-apt.log" 2>&1 || {
        tail -20 "$cache/chroot-apt.log" >&2
        return 1
    }
    chroot "$rootfs" apt-get clean
    umount "$rootfs/proc"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
}

mkdir -p "$cache"
tarball="$cache/debian-python-$suite.tar"
if podman image exists "$base"; then
    log "$base present"
else
    [[ -f $tarball ]] || make_rootfs_tarball "$tarball"
    log "importing $tarball as $base"
    podman import --quiet \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball" "$base" >/dev/null
fi

if ! out=$(podman run --rm --network none "$base" python3 -c 'import venv, ssl; print("ok")' 2>&1) \
    || [[ $out != ok ]]; then
    log "a container does not run here (CONTAINERS_CONF=$CONTAINERS_CONF): $out"
    exit 1
fi
log "ready: podman $(podman version --format '{{.Client.Version}}'), base $base"
