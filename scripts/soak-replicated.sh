#!/usr/bin/env bash
# Long soaks of replicated volumes, too long for scripts/test.sh:
#   - the record protocol and the engine over the simulated network that
#     drops, delays, duplicates and partitions (tests/replicated_sim.rs),
#     SEEDS seeds per configuration (default 20000, 3 to 5 minutes in a
#     release build; the suite runs 150; 2000 once missed a safety bug
#     that 20000 found, and 20000 found another at seed 16666);
#   - the Jepsen-style checker on a real cluster of network namespaces
#     (tests/replicated.rs no_acknowledged_write_is_lost_under_copy_faults),
#     ROUNDS fault rounds (default 40; the suite runs 4) from CHECK_SEED
#     (default: the time, printed so a failure can be replayed).
#
#   sudo scripts/soak-replicated.sh
#   SEEDS=500 ROUNDS=10 CHECK_SEED=7 sudo scripts/soak-replicated.sh
#
# Prints each soak's summary line (seeds, writes acknowledged, faults;
# rounds, writes issued and acknowledged, lost and corrupted) and exits
# non-zero if either fails. Everything a run makes is removed by the tests'
# own guards.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-20000}
rounds=${ROUNDS:-40}
check_seed=${CHECK_SEED:-$(date +%s)}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
status=0

echo "== simulator: $seeds seeds per configuration"
if ! REPL_SEEDS=$seeds cargo test --locked --release --test replicated_sim -- --nocapture >"$logs/sim.log" 2>&1; then
    status=1
    tail -n 40 "$logs/sim.log"
fi
grep -E '^seeds |^test result' "$logs/sim.log" || true

echo "== checker: $rounds rounds, seed $check_seed"
if ! REPL_CHECK_ROUNDS=$rounds REPL_CHECK_SEED=$check_seed cargo test --locked --test replicated \
    no_acknowledged_write_is_lost_under_copy_faults -- --exact --nocapture >"$logs/check.log" 2>&1; then
    status=1
    tail -n 60 "$logs/check.log"
fi
grep -E '^checker: |^test result' "$logs/check.log" || true

[ "$status" = 0 ] && echo "soak-replicated.sh: passed" || echo "soak-replicated.sh: FAILED"
exit "$status"
