#!/usr/bin/env bash
# Install (or reuse) the node_modules of one pinned JS client set.
#
#   tests/clients/js/npm-env.sh tests/clients/js               -> prints the env directory
#   tests/clients/js/npm-env.sh tests/clients/js/langsmith-0.9
#
# A set is a directory holding package.json + the committed package-lock.json. The env lives at
# .cache/clients/js-<name>-<sha256 of both files and `node --version`, 16 hex>/ (name = the
# directory's basename, "primary" for tests/clients/js itself) and is reused while those are unchanged (a
# finished env carries a .complete stamp; a half-built one is removed and rebuilt). `npm ci`
# installs exactly the lock file from the npm registry. The tests find it through CORDON_JS_ENV
# (harness/register.mjs).
set -euo pipefail

dir=${1:?usage: npm-env.sh PINNED_SET_DIR}
root=$(cd "$(dirname "$0")/../../.." && pwd)
cache=${CLIENTS_CACHE:-$root/.cache/clients}

[ -f "$dir/package.json" ] && [ -f "$dir/package-lock.json" ] ||
  { echo "npm-env.sh: $dir needs package.json and package-lock.json" >&2; exit 2; }
hash=$( { cat "$dir/package.json" "$dir/package-lock.json"; node --version; } | sha256sum | cut -c1-16)
name=$(basename "$(cd "$dir" && pwd)")
[ "$name" = js ] && name=primary   # tests/clients/js itself holds the primary set
env=$cache/js-$name-$hash

if [ -f "$env/.complete" ]; then
  echo "$env"
  exit 0
fi

rm -rf "$env"
mkdir -p "$env"
start=$(date +%s)
echo "npm-env.sh: installing $env from $dir/package-lock.json" >&2
cp "$dir/package.json" "$dir/package-lock.json" "$env/"
(cd "$env" && npm ci --no-audit --no-fund --loglevel=error >&2)
(cd "$env" && npm ls --depth=0 > versions.txt 2>&1) || true
touch "$env/.complete"
echo "npm-env.sh: installed in $(( $(date +%s) - start ))s" >&2
# Old envs for the same set (a previous hash) are dropped.
for old in "$cache"/js-"$name"-????????????????; do
  [ "$old" = "$env" ] || rm -rf "$old"
done
echo "$env"
