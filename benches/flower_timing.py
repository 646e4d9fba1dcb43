"""The timing the Flower comparison scripts share: GB/s of update bytes, median of runs."""

import statistics
import time


def timed(fn, bytes_, repeats):
    """Runs `fn` `repeats` times; returns the median of bytes_ / seconds / 1e9."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(bytes_ / (time.perf_counter() - start) / 1e9)
    return statistics.median(runs)
