#!/usr/bin/env bash
# Times Flower 1.42 on this machine beside our own figures, in the same run:
# FedAvg aggregation (compare_flower_fedavg.py against `medfl bench aggregate`, same N x D),
# and SecAgg+
# (same n, d and dropout): its building blocks (compare_flower_secagg.py, against
# `cargo bench -p medfl-shared --bench secagg`) and a whole simulated round with and
# without SecAgg+ (compare_flower_round.py, against `cargo bench --bench secure_round`).
# Installs Flower into a throwaway virtual environment; prints JSON lines.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${FLWR_VENV:-${TMPDIR:-/tmp}/medfl-flwr-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "flwr[simulation]==1.42.*"
fi
"$venv/bin/python" "$here/compare_flower_secagg.py"
for mode in secagg plain; do
    "$venv/bin/python" "$here/compare_flower_round.py" "$mode" 2>/dev/null | tail -n 1
done
# FedAvg aggregation, N x D as in the performance issue's table.
medfl="${MEDFL:-$here/../target/release/medfl}"
for nd in "100 1000000" "10 1000000" "100 100000"; do
    set -- $nd
    "$venv/bin/python" "$here/compare_flower_fedavg.py" "$1" "$2" 5
    if [ -x "$medfl" ]; then "$medfl" bench aggregate --sites "$1" --params "$2" --json; fi
done
