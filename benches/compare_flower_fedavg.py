"""Flower 1.42's FedAvg aggregation (flwr.server.strategy.aggregate: `aggregate` and
`aggregate_inplace`) on N updates of D float32 parameters, timed the way
`medfl bench aggregate` times ours. Prints one JSON line per function, in GB/s of
update bytes (N * D * 4 / seconds), median of REPEATS runs. Run by compare_flower.sh.

Usage: compare_flower_fedavg.py N D [REPEATS] [DISTINCT]  (DISTINCT updates cycled; default 4)
"""

import json
import sys

import flower_timing

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.common.typing import FitRes, Status, Code
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
D = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
REPEATS = int(sys.argv[3]) if len(sys.argv) > 3 else 5

rng = np.random.default_rng(1)
DISTINCT = int(sys.argv[4]) if len(sys.argv) > 4 else 4
distinct = [rng.uniform(-1, 1, D).astype(np.float32) for _ in range(min(N, DISTINCT))]
updates = [([distinct[k % len(distinct)]], k + 1) for k in range(N)]
bytes_ = N * D * 4


def timed(fn):
    return flower_timing.timed(fn, bytes_, REPEATS)


print(json.dumps({"flower": "aggregate", "sites": N, "params": D, "gbps": timed(lambda: aggregate(updates))}))

fit_results = [
    (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), w, {}))
    for u, w in updates
]
print(json.dumps({"flower": "aggregate_inplace", "sites": N, "params": D,
                  "gbps": timed(lambda: aggregate_inplace(fit_results))}))
