#!/usr/bin/env bash
# Create (or reuse) a Python virtual environment for one pinned requirements file.
#
#   tests/clients/venv.sh tests/clients/python/requirements.txt   -> prints the venv path
#
# The venv lives at .cache/clients/py-<name>-<sha256 of the requirements file, 16 hex>/ and is
# reused as long as that file is unchanged (a finished venv carries a .complete stamp; a
# half-built one is removed and rebuilt). Uses the machine's python3 + pip (PyPI).
set -euo pipefail

req=${1:?usage: venv.sh REQUIREMENTS_FILE}
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
cache=${CLIENTS_CACHE:-$root/.cache/clients}

[ -f "$req" ] || { echo "venv.sh: no such file: $req" >&2; exit 2; }
hash=$( { cat "$req"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
name=$(basename "$req" .txt)
venv=$cache/py-$name-$hash

if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi

rm -rf "$venv"
mkdir -p "$cache"
start=$(date +%s)
echo "venv.sh: building $venv from $req" >&2
"$python" -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
"$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
touch "$venv/.complete"
echo "venv.sh: built in $(( $(date +%s) - start ))s" >&2
# Old venvs for the same requirements file (a previous hash) are dropped.
for old in "$cache"/py-"$name"-????????????????; do
  [ "$old" = "$venv" ] || rm -rf "$old"
done
echo "$venv"
