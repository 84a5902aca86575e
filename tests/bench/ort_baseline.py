#!/usr/bin/env python3
"""Baseline for `cargo bench -p ternd --bench engine`: onnxruntime, single-threaded, batch 1,
on the golden input of every shipped package, median of N runs (µs).

    pip install -r firmware-updates/models/requirements.txt
    python3 tests/bench/ort_baseline.py [N]

Run it in the same session as the cargo bench so the two tables are comparable.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "firmware-updates", "models")
PACKAGES = ["digits-cnn-f32", "digits-cnn-int8", "digits-mlp-f32", "digits-mlp-int8", "iris-mlp-f32", "iris-mlp-int8"]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    print(f"onnxruntime {ort.__version__}, batch 1, 1 thread, median of {n} runs (µs)")
    print(f"{'package':<18} {'onnxruntime':>12}")
    for name in PACKAGES:
        pkg = os.path.join(MODELS, name)
        sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        x = np.load(os.path.join(pkg, "golden", "0-input.npy"))
        for _ in range(50):
            sess.run(None, {"input": x})
        times = []
        for _ in range(n):
            s = time.perf_counter()
            sess.run(None, {"input": x})
            times.append(time.perf_counter() - s)
        print(f"{name:<18} {sorted(times)[n // 2] * 1e6:>12.1f}")


if __name__ == "__main__":
    main()
