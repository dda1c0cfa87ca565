#!/usr/bin/env bash
# mypy needs files laid out as their module names (vims/collector/...), while the repository keeps
# the parts at its top level. Build that view from symlinks under .venv/ and check the package there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
view="$root/.venv/typecheck"
rm -rf "$view"
mkdir -p "$view/vims"
for f in "$root"/vims/*; do ln -s "$f" "$view/vims/"; done
for part in collector models training remote datasets avm; do ln -s "$root/$part" "$view/vims/$part"; done
cd "$view" && "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" -p vims
