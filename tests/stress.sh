#!/usr/bin/env bash
# Run the fault, gRPC and deployment tests N times in a row while `stress-ng --cpu 2`
# keeps the CPUs busy, to catch tests that depend on timing. Stops at the first failing
# run; stress-ng is always stopped on exit. Installs nothing.
#
#   tests/stress.sh [N]            N runs (default 10)
#   PYTHON=/path/to/python tests/stress.sh 3
#
# PYTHON defaults to .venv/bin/python (what `make setup` builds). Extra pytest options
# can be given in PYTEST_ARGS (e.g. PYTEST_ARGS="-x -vv").
set -u

N="${1:-10}"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [N]  (N: number of runs, a positive integer; default 10)" >&2
  exit 2
fi

cd "$(dirname "$0")/.." || exit 2

if ! command -v stress-ng >/dev/null 2>&1; then
  echo "stress.sh: stress-ng is not installed (e.g. apt-get install stress-ng)" >&2
  exit 2
fi

PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
  echo "stress.sh: $PYTHON cannot import pytest (run make setup, or set PYTHON)" >&2
  exit 2
fi

FILES=()
for f in tests/test_split_faults.py tests/test_split_grpc.py tests/test_splitfed_grpc.py \
  tests/test_fed_faults.py tests/test_fed_deployment.py; do
  if [[ -f "$f" ]]; then
    FILES+=("$f")
  else
    echo "stress.sh: $f does not exist; skipped" >&2
  fi
done
if [[ ${#FILES[@]} -eq 0 ]]; then
  echo "stress.sh: none of the test files exist" >&2
  exit 2
fi

STRESS_PID=""
stop_stress() {
  if [[ -n "$STRESS_PID" ]]; then
    # stress-ng runs in its own process group (set -m below): stop the group, i.e. the
    # parent and its CPU workers, then reap the parent
    kill -TERM -- "-$STRESS_PID" 2>/dev/null || kill -TERM "$STRESS_PID" 2>/dev/null
    wait "$STRESS_PID" 2>/dev/null
    STRESS_PID=""
  fi
}
trap stop_stress EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

set -m # job control: the background job gets a process group of its own
stress-ng --cpu 2 --quiet &
STRESS_PID=$!
set +m
echo "stress.sh: stress-ng --cpu 2 running (pid $STRESS_PID); $N run(s) of: ${FILES[*]}"

passed=0
for ((i = 1; i <= N; i++)); do
  echo "=== run $i of $N ($(date +%H:%M:%S))"
  start=$SECONDS
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
  if "$PYTHON" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${FILES[@]}"; then
    passed=$((passed + 1))
    echo "=== run $i passed in $((SECONDS - start)) s"
  else
    echo "=== run $i FAILED after $((SECONDS - start)) s; stopping"
    break
  fi
done

echo "passed $passed of $N runs"
[[ "$passed" -eq "$N" ]]
