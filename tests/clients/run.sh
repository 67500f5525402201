#!/usr/bin/env bash
# The official-client compatibility suites (`make clients-test`).
#
# For each pinned requirements file (default: requirements.txt, then every other
# tests/clients/python/requirements-*.txt, or
# the ones named in CLIENTS_REQUIREMENTS), get its venv (tests/clients/venv.sh, cached under
# .cache/clients/) and run the pytest suite in tests/clients/python against a fresh
# `cordon serve` (CORDON_BIN, default target/debug/cordon then target/release/cordon).
# Extra arguments go to pytest, e.g. `tests/clients/run.sh -k exec -x`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if [ -n "${CLIENTS_REQUIREMENTS:-}" ]; then
  read -r -a reqs <<< "$CLIENTS_REQUIREMENTS"
else
  # The primary client (requirements.txt) first, then the other pinned versions.
  reqs=(tests/clients/python/requirements.txt)
  for r in tests/clients/python/requirements-*.txt; do reqs+=("$r"); done
fi

status=0
summary=()
for req in "${reqs[@]}"; do
  venv=$(tests/clients/venv.sh "$req")
  version=$(grep -m1 '^langsmith==' "$venv/freeze.txt" || echo "langsmith?")
  echo "=== official Python client suite: $version ($req)"
  start=$(date +%s)
  rc=0
  "$venv/bin/python" -m pytest tests/clients/python "$@" || rc=$?
  summary+=("$version: exit $rc in $(( $(date +%s) - start ))s")
  [ "$rc" -eq 0 ] || status=$rc
done
echo "=== client suites"
printf '  %s\n' "${summary[@]}"
exit "$status"
