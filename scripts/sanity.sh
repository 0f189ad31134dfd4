#!/usr/bin/env bash
# Runs the upstream CSI conformance suite (csi-sanity, kubernetes-csi/csi-test)
# against a freshly started `stowage serve`, in mount mode and in block mode,
# with `provisioning=thick` as the mutable parameter of the ModifyVolume tests.
#
#   scripts/sanity.sh [extra csi-sanity flags…]
#   SANITY_POOL_FS=xfs|ext4|tmpfs scripts/sanity.sh   (the pool's filesystem; xfs by default)
#   STOWAGE_BIN=target/debug/stowage scripts/sanity.sh (skip the release build)
#   STOWAGE_SERVE_ARGS="--pool-image never" scripts/sanity.sh (extra serve flags)
#
# Needs root (mounts, loop devices) and `csi-sanity` on PATH (or CSI_SANITY=…);
# build it with `go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.3.1`.
# The server runs on its own xfs pool in a sparse image under a temporary
# directory; everything (server, mounts, loop device, files) is removed on exit.
set -euo pipefail

sanity=${CSI_SANITY:-csi-sanity}
command -v "$sanity" >/dev/null || {
    echo "sanity.sh: $sanity not found; see the comment at the top of this script" >&2
    exit 2
}
[ "$(id -u)" -eq 0 ] || { echo "sanity.sh: run as root" >&2; exit 2; }

cd "$(dirname "$0")/.."
pool_fs=${SANITY_POOL_FS:-xfs}
case "$pool_fs" in xfs|ext4|tmpfs) ;; *) echo "sanity.sh: SANITY_POOL_FS must be xfs, ext4 or tmpfs" >&2; exit 2;; esac
if [ -n "${STOWAGE_BIN:-}" ]; then
    bin=$(realpath "$STOWAGE_BIN")
else
    cargo build --release --locked
    bin=$PWD/target/release/stowage
fi

work=$(mktemp -d /tmp/stowage-sanity.XXXXXX)
server=
loopdev=
cleanup() {
    set +e
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    # The pool image stowage keeps inside an ext4/tmpfs pool is mounted
    # below the state directory: unmount it first.
    mountpoint -q "$work/state/pool" && umount "$work/state/pool"
    mountpoint -q "$work/state" && umount "$work/state"
    [ -n "$loopdev" ] && losetup -d "$loopdev"
    rm -rf "$work"
}
trap cleanup EXIT

# A 64 GiB sparse pool: thick 10 GiB test volumes fit, the disk (or, for
# tmpfs, memory) does not need that much free space unless the tests write
# it. On ext4 and tmpfs, stowage keeps its pool in an xfs image by default.
mkdir "$work/state"
if [ "$pool_fs" = tmpfs ]; then
    mount -t tmpfs -o size=64G,mode=0700 stowage-sanity "$work/state"
else
    truncate -s 64G "$work/pool.img"
    "mkfs.$pool_fs" -q "$work/pool.img"
    loopdev=$(losetup --find --show "$work/pool.img")
    mount "$loopdev" "$work/state"
fi

printf 'provisioning: thick\n' >"$work/mutable.yaml"
printf 'backend: block\n' >"$work/block.yaml"

# A volume limit per node, so the attach-limit test runs instead of skipping.
"$bin" serve --endpoint "unix://$work/csi.sock" --state-dir "$work/state" \
    --node-id sanity --max-volumes-per-node 8 --log-format text ${STOWAGE_SERVE_ARGS:-} 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done

status=0
run() {
    local name=$1; shift
    echo "== csi-sanity: $name ($pool_fs pool)"
    "$sanity" --csi.endpoint "unix://$work/csi.sock" \
        --csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
        --csi.testvolumemutableparameters "$work/mutable.yaml" \
        --csi.testvolumeparameters "$work/block.yaml" \
        --csi.testnodevolumeattachlimit \
        --csi.junitfile "$work/junit-$name.xml" \
        "$@" || status=1
}
run mount --csi.testvolumeaccesstype mount "$@"
run block --csi.testvolumeaccesstype block "$@"

if [ "$status" -ne 0 ]; then
    echo "sanity.sh: failures; server log follows" >&2
    tail -n 200 "$work/serve.log" >&2
fi
exit "$status"
