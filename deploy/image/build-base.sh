#!/usr/bin/env bash
# Builds the runtime stage's base, `debian:bookworm-slim`, on the local Docker engine from
# Debian's packages, for machines that cannot pull images (CI, the development machines).
#
# The result is tagged `debian:bookworm-slim` on the local engine only and is never pushed:
# it is a stand-in for Docker Hub's image, made the same way in spirit (debootstrap's minbase
# variant, then what the official slim image strips: documentation, man pages, locales, apt
# lists). A machine that can pull uses the real image and never needs this script.
#
# Idempotent: does nothing when the tag already exists. Needs root (debootstrap chroots).
#
#   deploy/image/build-base.sh                 # debian:bookworm-slim from deb.debian.org
#   MIRROR=http://... deploy/image/build-base.sh
set -euo pipefail

image="${BASE_IMAGE:-debian:bookworm-slim}"
suite="${SUITE:-bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"

exists() {
    if docker image inspect "$image" >/dev/null 2>&1; then
        echo "build-base: $image already on the local engine"
        exit 0
    fi
}
exists
# One build at a time on this machine (tests of two checkouts may start it together).
exec 9>"${TMPDIR:-/tmp}/credyt-proxy-build-base.lock"
flock 9
exists

if ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
fi

rootfs="$(mktemp -d /tmp/build-base.XXXXXX)"
cleanup() {
    # debootstrap mounts /proc and /sys in the target; a failed run can leave them mounted
    umount -R "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

# What the official slim image strips (and keeps stripped: dpkg skips these paths on every
# later install, as docker-library/debian's slim variant configures it).
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/*
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
rm -rf "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
# the build host's name and resolver are not the image's: the engine provides both at run time
: >"$rootfs/etc/hostname"
: >"$rootfs/etc/resolv.conf"

tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $suite $mirror, slimmed (deploy/image/build-base.sh)" \
        - "$image"
echo "build-base: $image built on the local engine"
