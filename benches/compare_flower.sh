#!/usr/bin/env bash
# Times Flower 1.42 on this machine beside our own figures, in the same run:
# FedAvg aggregation (compare_flower_fedavg.py against `medfl bench aggregate`, same N x D),
# and SecAgg+
# (same n, d and dropout): its building blocks (compare_flower_secagg.py, against
# `cargo bench --bench secagg`) and a whole simulated round with and
# without SecAgg+ (compare_flower_round.py, against `cargo bench --bench secure_round`).
# and the robust aggregators (compare_flower_robust.py against `medfl bench aggregate
# --strategy median|trimmed-mean|krum`).
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
    # N distinct updates on both sides: every one is read from memory.
    "$venv/bin/python" "$here/compare_flower_fedavg.py" "$1" "$2" 5 "$1"
    if [ -x "$medfl" ]; then "$medfl" bench aggregate --sites "$1" --params "$2" --distinct "$1" --json; fi
done
# Robust aggregators (and FedAvg again, in the same run), N = 100 distinct updates of
# D = 10^6, beside `medfl bench aggregate --strategy ...` on the same N x D.
"$venv/bin/python" "$here/compare_flower_robust.py" 100 1000000 5
if [ -x "$medfl" ]; then
    for strategy in fedavg median trimmed-mean krum; do
        "$medfl" bench aggregate --sites 100 --params 1000000 --strategy "$strategy" --json
    done
fi
