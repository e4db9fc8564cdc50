#!/usr/bin/env bash
# Install secureinfer with every scheme on a fresh machine, then run the main job: the
# same network under every installed scheme on the embedded digits data, side by side
# (results/bench.{json,md,png}).
#
#   bash install.sh             install, then run the benchmark
#   bash install.sh --no-run    install only
#
# Pyfhel (BFV) has no wheel: scripts/build_pyfhel_wheel.sh builds one once (about 2 to 5
# minutes) and caches it in ~/.cache/secureinfer/wheels (or $SECUREINFER_WHEELHOUSE).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
export SECUREINFER_WHEELHOUSE=${SECUREINFER_WHEELHOUSE:-$HOME/.cache/secureinfer/wheels}

bash scripts/build_pyfhel_wheel.sh "$SECUREINFER_WHEELHOUSE"
# torch is pinned to the CPU build 2.13.0 (see pyproject.toml).
"$PYTHON" -m pip install --quiet --find-links "$SECUREINFER_WHEELHOUSE" -e ".[all,dev]"
"$PYTHON" -m secureinfer doctor

if [ "${1:-}" != "--no-run" ]; then
  "$PYTHON" -m secureinfer bench --out results
fi
