#!/usr/bin/env bash
# Runs stowage's whole test suite on a fresh Debian machine, as root:
# installs the filesystem tools (and systemd-analyze) the tests use, then checks
# formatting and lints, and runs every test (unit, integration, property).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the integration tests mount filesystems and attach loop devices; run as root" >&2
  exit 1
fi

need=()
for tool in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs blkid:util-linux systemd-analyze:systemd; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
modprobe loop 2>/dev/null || true

# tests/python_client.rs calls the server with Python's grpcio (gRPC C-core).
if ! python3 -c 'import grpc' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-pip
  fi
  # Debian's python3 is externally managed (PEP 668): then pip must be told.
  python3 -m pip install --quiet grpcio 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages grpcio
fi

# The workspace: the stowage package and the sidecars crate.
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The unit-file test must check the units with systemd-analyze, not skip it.
export STOWAGE_REQUIRE_SYSTEMD_ANALYZE=1
cargo test --workspace --locked --lib --bins --tests
