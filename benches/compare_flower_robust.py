"""Flower 1.42's robust aggregators (flwr.server.strategy.aggregate: `aggregate_median`,
`aggregate_trimmed_avg`, `aggregate_krum`) and its FedAvg `aggregate` on N distinct
updates of D float32 parameters, timed the way `medfl bench aggregate --strategy`
times ours (same N, D, and the same settings: the trimmed mean cuts β = 0.2 at each
end, Krum tolerates f = 1 and keeps m = 1). Prints
one JSON line per function, in GB/s of update bytes (N * D * 4 / seconds), median
of REPEATS runs. Run by compare_flower.sh.

Usage: compare_flower_robust.py N D [REPEATS]
"""

import json
import sys

import flower_timing

import numpy as np
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
D = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
REPEATS = int(sys.argv[3]) if len(sys.argv) > 3 else 5

rng = np.random.default_rng(1)
updates = [([rng.uniform(-1, 1, D).astype(np.float32)], 1) for _ in range(N)]
bytes_ = N * D * 4


def timed(fn):
    return flower_timing.timed(fn, bytes_, REPEATS)


for name, fn in [
    ("aggregate", lambda: aggregate(updates)),
    ("aggregate_median", lambda: aggregate_median(updates)),
    ("aggregate_trimmed_avg", lambda: aggregate_trimmed_avg(updates, 0.2)),
    ("aggregate_krum", lambda: aggregate_krum(updates, 1, 1)),
]:
    print(json.dumps({"flower": name, "sites": N, "params": D, "gbps": timed(fn)}), flush=True)
