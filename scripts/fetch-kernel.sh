#!/bin/sh
# Fetch the Debian kernel the image tests and the testbed boot, and extract its
# bzImage to .cache/kernel/vmlinuz in the checkout. A no-op when it is there.
#
# linux-image-amd64 is a metapackage that depends on one exact
# linux-image-<abi>-amd64; resolve it with apt-cache and download only that one
# package (a glob would download dozens). The .deb is kept in
# $RAMPART_CACHE (default /var/tmp/rampart-cache) so a fresh checkout on the
# same machine does not download it again.
set -eu
cd "$(dirname "$0")/.."
out=.cache/kernel
[ -s "$out/vmlinuz" ] && { touch "$out/vmlinuz"; exit 0; }  # make sees it current
cache=${RAMPART_CACHE:-/var/tmp/rampart-cache}
mkdir -p "$cache" "$out"
resolve() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
}
pkg=$(resolve)
if [ -z "$pkg" ]; then
    # No package lists yet (a fresh machine whose packages were all installed).
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q >/dev/null
    pkg=$(resolve)
fi
if [ -z "$pkg" ]; then
    echo "fetch-kernel: cannot resolve linux-image-amd64 (run apt-get update)" >&2
    exit 1
fi
deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
    echo "fetch-kernel: downloading $pkg into $cache"
    (cd "$cache" && apt-get download -q "$pkg")
    deb=$(ls "$cache/${pkg}"_*.deb | head -n 1)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
set -- "$tmp"/boot/vmlinuz-*
[ -f "$1" ] || { echo "fetch-kernel: no /boot/vmlinuz-* in $deb" >&2; exit 1; }
cp "$1" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "fetch-kernel: $out/vmlinuz from $(basename "$deb")"
