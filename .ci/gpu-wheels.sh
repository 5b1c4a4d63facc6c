#!/usr/bin/env bash
# Fill .whl/ for the lent GPU machine (Python 3.12, x86-64, offline): the shared wheelhouse, then pydantic's own needs.
#
# ../shared/device/make_wheelhouse.sh pins pydantic 2.14.4 beside pydantic-core 2.46.4 and typing-inspection 0.4.2,
# but that pydantic requires pydantic-core==2.50.5, typing-inspection>=0.4.4 and typing-extensions>=4.16.0; with
# the pins as they are, `import deepspeed` fails there (seen 2026-11-28 on an H200). This fetches what pydantic's
# metadata asks for and drops the wheels it replaces, so each package is there once.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/make_wheelhouse.sh >/dev/null
PY=${PYTHON:-python3}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mapfile -t needs < <(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: \([^;]*\)$/\1/p')
for need in "${needs[@]}"; do
  name=$(echo "$need" | sed 's/[<>=!~ ].*//')
  rm -f .whl/"${name//-/_}"-*.whl
  $PY -m pip download -q --no-deps "${plat[@]}" -d .whl "$need"
done
ls .whl
