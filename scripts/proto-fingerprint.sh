#!/usr/bin/env bash
# Regenerates proto/csi-v1.12.0.fingerprint, the upstream CSI v1.12.0 wire
# contract that tests/proto_contract.rs holds proto/csi.proto to, from the
# upstream csi.proto:
#
#   scripts/proto-fingerprint.sh [PATH/TO/csi.proto]
#
# The default is ../shared/reference/csi.proto beside the repository (or
# $STOWAGE_REFERENCE_PROTO). The fingerprint is the descriptor protox
# compiles from that file (source info removed) in protobuf text format,
# one section per declaration, after a hash of its encoding; the test code
# computes it (committed_fingerprint_is_the_upstream_references with
# STOWAGE_WRITE_FINGERPRINT=1), so the script and the check cannot drift
# apart. Afterwards the whole contract test runs; `git diff proto/` shows
# what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-${STOWAGE_REFERENCE_PROTO:-../shared/reference/csi.proto}}
[ -f "$ref" ] || {
    echo "proto-fingerprint.sh: no upstream csi.proto at $ref (pass its path)" >&2
    exit 2
}
export STOWAGE_REFERENCE_PROTO
STOWAGE_REFERENCE_PROTO=$(realpath "$ref")
STOWAGE_WRITE_FINGERPRINT=1 cargo test --locked --test proto_contract -- \
    --exact committed_fingerprint_is_the_upstream_references
cargo test --locked --test proto_contract
