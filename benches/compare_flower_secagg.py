"""Flower 1.42's SecAgg+ building blocks, timed like benches/secagg.rs.

Mirrors what Flower's client mod does per site in stage 2 (secaggplus_mod.py,
_collect_masked_vectors): quantize, add the private mask, then for each neighbour
derive the shared key and add or subtract its pairwise mask, all with Flower's own
functions; and what its server workflow does to unmask (one private mask per
survivor, one pairwise mask per survivor-dropped pair). Run by benches/compare_flower.sh.
"""

import json
import sys
import time

import numpy as np
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

D = 1_000_000
MOD_RANGE = 1 << 32
dims = [(D,)]


def best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def keystream():
    pseudo_rand_gen(b"\x09" * 32, MOD_RANGE, dims)


def mask_one_site(n):
    keys = [generate_key_pairs() for _ in range(n)]
    sk = private_key_to_bytes(keys[0][0])
    pks = [public_key_to_bytes(k[1]) for k in keys]
    params = [np.random.uniform(-0.1, 0.1, D).astype(np.float32)]

    def run():
        q = quantize(params, 3.0, 1 << 22)
        q = parameters_addition(q, pseudo_rand_gen(b"\x05" * 32, MOD_RANGE, dims))
        for j in range(1, n):
            shared = generate_shared_key(bytes_to_private_key(sk), bytes_to_public_key(pks[j]))
            m = pseudo_rand_gen(shared, MOD_RANGE, dims)
            q = parameters_addition(q, m) if j % 2 else parameters_subtraction(q, m)
        parameters_mod(q, MOD_RANGE)

    return run


def unmask(n=100, dropped=10):
    keys = [generate_key_pairs() for _ in range(n)]
    total = [np.zeros(D, dtype=np.int64)]

    def run():
        agg = total
        for u in range(dropped, n):
            agg = parameters_subtraction(agg, pseudo_rand_gen(b"\x05" * 32, MOD_RANGE, dims))
        for v in range(dropped):
            for u in range(dropped, n):
                shared = generate_shared_key(keys[v][0], keys[u][1])
                agg = parameters_addition(agg, pseudo_rand_gen(shared, MOD_RANGE, dims))
        parameters_mod(agg, MOD_RANGE)

    return run


if __name__ == "__main__":
    out = {"keystream_ns_per_word": best(keystream) / D * 1e9}
    for n in (10, 100):
        out[f"mask_one_site_n{n}_s"] = best(mask_one_site(n), repeat=2 if n == 100 else 3)
    out["unmask_n100_drop10_s"] = best(unmask(), repeat=1)
    json.dump(out, sys.stdout)
    print()
