#!/usr/bin/env python3
"""pydicom's decoding throughput on the files `cargo bench --bench imaging` synthesizes
(target/dicom-bench/), to set beside dicom-rs's MB/s from the same session.

    cargo bench --bench imaging -- dicom
    python3 scripts/dicom_bench.py [target/dicom-bench]

Needs pydicom and numpy (JPEG Baseline also needs pillow or pylibjpeg; a file pydicom
cannot decode is reported, not timed)."""

import os
import sys
import time

import pydicom


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "target/dicom-bench"
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        try:
            pydicom.dcmread(path).pixel_array
        except Exception as e:  # a missing codec: say so and go on
            print(f"{name}: pydicom cannot decode it here ({type(e).__name__}: {e})")
            continue
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            pydicom.dcmread(path).pixel_array
            reps += 1
        seconds = (time.perf_counter() - start) / reps
        print(f"{name}: {size / seconds / 1e6:.1f} MB/s ({seconds * 1e3:.2f} ms a file, {size} bytes)")


if __name__ == "__main__":
    main()
