#!/usr/bin/env bash
# Times Flower 1.42's SecAgg+ building blocks on this machine, for the comparison with
# `cargo bench -p medfl-shared --bench secagg` (same n, d and dropout). Installs Flower
# into a throwaway virtual environment; prints one JSON object.
set -euo pipefail
venv="${FLWR_VENV:-${TMPDIR:-/tmp}/medfl-flwr-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "flwr==1.42.*"
fi
exec "$venv/bin/python" "$(dirname "$0")/compare_flower_secagg.py"
