#!/usr/bin/env bash
# The official-client compatibility suites (`make clients-test`).
#
# For each pinned requirements file (default: requirements.txt, then every other
# tests/clients/python/requirements-*.txt, then the legacy clients'
# tests/clients/python-legacy/requirements-*.txt, or the ones named in CLIENTS_REQUIREMENTS), get
# its venv (tests/clients/venv.sh, cached under .cache/clients/) and run the pytest suite in the
# requirements file's own directory (python/ or python-legacy/) against a fresh `cordon serve`
# (CORDON_BIN, default target/debug/cordon then target/release/cordon).
# Extra arguments go to pytest, e.g. `tests/clients/run.sh -k exec -x`; a suite they deselect
# entirely (pytest exit 5) counts as passed.
#
# The primary requirements set also runs a second time against microVM sandboxes: a server with
# `--default-runtime microvm` (CORDON_DEFAULT_RUNTIME, see conftest.py) and only the tests marked
# `microvm` (conftest's MICROVM_SUBSET: every data-plane operation once, ~2-3 minutes under TCG).
# It needs the guest kernel (`cordon prepare`, in CORDON_CACHE_DIR or /var/cache/cordon);
# CLIENTS_MICROVM=0 skips the pass, CLIENTS_MICROVM=only runs nothing else of the Python suites.
#
# Then the JS suites: for each pinned set (default: tests/clients/js, then every
# tests/clients/js/*/ holding a package-lock.json, then tests/clients/js-legacy, or the
# directories named in CLIENTS_JS; a set with a test/ directory of its own runs those tests,
# the others run tests/clients/js/test;
# CLIENTS_JS=none skips them), get its node_modules (tests/clients/js/npm-env.sh, cached under
# .cache/clients/) and run tests/clients/js/harness/run.mjs (node --test) against its own fresh
# `cordon serve`. CLIENTS_JS_ARGS go to `node --test`, e.g. CLIENTS_JS_ARGS=--test-name-pattern=kill.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if [ -n "${CLIENTS_REQUIREMENTS:-}" ]; then
  read -r -a reqs <<< "$CLIENTS_REQUIREMENTS"
else
  # The primary client (requirements.txt) first, then the other pinned versions.
  reqs=(tests/clients/python/requirements.txt)
  for r in tests/clients/python/requirements-*.txt; do reqs+=("$r"); done
  # The legacy (template-era) clients lack the current API: their own suite, python-legacy/.
  for r in tests/clients/python-legacy/requirements-*.txt; do reqs+=("$r"); done
fi

status=0
summary=()
microvm=${CLIENTS_MICROVM:-1}
[ "$microvm" != only ] || reqs=("${reqs[0]}")
for req in "${reqs[@]}"; do
  venv=$(tests/clients/venv.sh "$req")
  version=$(grep -m1 '^langsmith==' "$venv/freeze.txt" || echo "langsmith?")
  suite=$(dirname "$req")
  echo "=== official Python client suite: $version ($req, $suite)"
  start=$(date +%s)
  rc=0
  if [ "$microvm" != only ]; then
    "$venv/bin/python" -m pytest "$suite" "$@" || rc=$?
    [ "$rc" -ne 5 ] || { echo "(no test of $suite selected)"; rc=0; }
    summary+=("$version: exit $rc in $(( $(date +%s) - start ))s")
    [ "$rc" -eq 0 ] || status=$rc
  fi
  if [ "$req" = "${reqs[0]}" ] && [ "$microvm" != 0 ]; then
    echo "=== official Python client suite on microVM sandboxes: $version ($suite, -m microvm)"
    start=$(date +%s)
    rc=0
    CORDON_DEFAULT_RUNTIME=microvm "$venv/bin/python" -m pytest "$suite" -m microvm "$@" || rc=$?
    [ "$rc" -ne 5 ] || { echo "(no microvm test of $suite selected)"; rc=0; }
    summary+=("$version on microVMs: exit $rc in $(( $(date +%s) - start ))s")
    [ "$rc" -eq 0 ] || status=$rc
  fi
done
if [ "${CLIENTS_JS:-}" = none ]; then
  js_sets=()
elif [ -n "${CLIENTS_JS:-}" ]; then
  read -r -a js_sets <<< "$CLIENTS_JS"
else
  # The primary set (langsmith 0.12.x) first, then the other pinned sets (langsmith-0.9 + deepagents).
  js_sets=(tests/clients/js)
  for d in tests/clients/js/*/; do [ -f "$d/package-lock.json" ] && js_sets+=("${d%/}"); done
  # The legacy (template-era) client lacks the current API: its own tests, js-legacy/test.
  js_sets+=(tests/clients/js-legacy)
fi
read -r -a js_args <<< "${CLIENTS_JS_ARGS:-}"
for set in "${js_sets[@]}"; do
  env=$(tests/clients/js/npm-env.sh "$set")
  version=$(node -p "'langsmith@' + require('$env/node_modules/langsmith/package.json').version" 2>/dev/null || echo "langsmith?")
  tests=tests/clients/js
  [ -d "$set/test" ] && [ "$set" != tests/clients/js ] && tests=$set
  echo "=== official JS client suite: $version ($set, tests in $tests/test)"
  start=$(date +%s)
  rc=0
  CORDON_JS_TESTS=$tests node tests/clients/js/harness/run.mjs "$env" "${js_args[@]}" || rc=$?
  summary+=("$version (js): exit $rc in $(( $(date +%s) - start ))s")
  [ "$rc" -eq 0 ] || status=$rc
done

echo "=== client suites"
printf '  %s\n' "${summary[@]}"
exit "$status"
