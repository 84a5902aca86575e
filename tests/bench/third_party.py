#!/usr/bin/env python3
"""tern against onnxruntime on the third-party packages, same inputs, one thread each.

Usage: python3 tests/bench/third_party.py [PACKAGES_DIR] [RUNS]
  PACKAGES_DIR  what tests/models/fetch-third-party.sh printed (default: its default cache)
  RUNS          runs per model (default 30)
Needs a built ternd (target/release/ternd if present, else target/debug/ternd; tract is built
with opt-level 3 in both) and Python with numpy and onnxruntime.

For each package it feeds golden/0.npz (the inputs onnxruntime's golden outputs came from):
onnxruntime's InferenceSession.run (intra_op_num_threads = 1), and `ternd infer` on a folder
of RUNS copies of the same .npz, whose per-step latency_us covers everything tern does for a
request (input check, run, postprocess). Medians, the first run of each left out; then the
ratio tern / onnxruntime.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                       "tern", "third-party", "packages")


def ternd():
    for p in ("target/release/ternd", "target/debug/ternd"):
        if os.path.exists(os.path.join(ROOT, p)):
            return os.path.join(ROOT, p)
    sys.exit("build ternd first (cargo build -p ternd --release)")


def ort_ms(pkg, runs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # Silero's graph has unused initialisers it warns about
    sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    z = np.load(os.path.join(pkg, "golden", "0.npz"))
    feed = {k[3:]: z[k] for k in z.files if k.startswith("in/")}
    for i in sess.get_inputs():
        if i.name not in feed:  # a constant input: sr
            feed[i.name] = np.array(16000, dtype=np.int64)
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[1:])


def tern_ms(pkg, runs, exe):
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs + 1):
            shutil.copy(os.path.join(pkg, "golden", "0.npz"), os.path.join(d, f"{i:04}.npz"))
        out = subprocess.run([exe, "infer", "--model", pkg, "--input", d, "--json"],
                             check=True, capture_output=True, text=True).stdout
    lat = [json.loads(l)["latency_us"] / 1000 for l in out.splitlines()]
    return statistics.median(lat[1:])


def main():
    pkgs = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    exe = ternd()
    print(f"ternd: {os.path.relpath(exe, ROOT)}; onnxruntime {ort.__version__}; {runs} runs, 1 thread")
    print(f"{'model':<12} {'input':<22} {'tern ms':>9} {'ort ms':>9} {'ratio':>7}")
    for name in ("ppocr-det", "ppocr-cls", "ppocr-rec", "silero-vad"):
        pkg = os.path.join(pkgs, name)
        z = np.load(os.path.join(pkg, "golden", "0.npz"))
        shape = [z[k].shape for k in z.files if k.startswith("in/")][0]
        o = ort_ms(pkg, runs)
        t = tern_ms(pkg, runs, exe)
        print(f"{name:<12} {str(list(shape)):<22} {t:>9.2f} {o:>9.2f} {t / o:>6.2f}x")


if __name__ == "__main__":
    main()
