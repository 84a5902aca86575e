#!/usr/bin/env python3
"""Every package through every plan tern has, and onnxruntime, on the same input, one run.

Usage: python3 tests/bench/engines.py [RUNS]     (default 200 runs per plan)
Needs a release ternd (`cargo build --release -p ternd`) and Python with numpy and
onnxruntime. Packages: the shipped ones (firmware-updates/models, not the -broken fixtures) and
the third-party ones from tests/models/fetch-third-party.sh, when its cache is there.

For each package and each plan (`tract+fold`, `tract`, `tract+float` for quantised models,
`onnxruntime`, and `auto`, which times those that pass the golden vectors and serves the
fastest), `ternd infer --plan P --repeat RUNS
--json` on the package's first golden input prints the median of tern's own latency_us: the
whole request (input checks, run, postprocess). onnxruntime's figure is InferenceSession.run
alone on the same arrays, one thread. Ratios are against the faster of raw tract (`tract`)
and onnxruntime, the target the engine issue sets for `auto`. Last, each int8 package against
its float form with tract's plans only (the best of them each): the price of int8 in tern on
a box without onnxruntime.
"""
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "tern", "third-party", "packages")
PLANS = ["tract+fold", "tract", "tract+float", "onnxruntime", "auto"]


def golden_input(pkg):
    """The first golden case's input file, and the arrays onnxruntime gets for it."""
    npz = os.path.join(pkg, "golden", "0.npz")
    if os.path.exists(npz):
        z = np.load(npz)
        return npz, {k[3:]: z[k] for k in z.files if k.startswith("in/")}
    npy = os.path.join(pkg, "golden", "0-input.npy")
    return npy, None


def ort_us(pkg, feed, runs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    if feed is None:  # format 1: the one input, from the .npy
        feed = {sess.get_inputs()[0].name: np.load(os.path.join(pkg, "golden", "0-input.npy"))}
    for i in sess.get_inputs():
        if i.name not in feed:  # a constant the manifest gives (Silero's sr)
            feed[i.name] = np.array(16000, dtype=np.int64)
    times = []
    for _ in range(runs + 5):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times[5:])


def tern_us(exe, pkg, path, plan, runs):
    out = subprocess.run([exe, "infer", "--model", pkg, "--input", path, "--plan", plan,
                          "--repeat", str(runs), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1][:60]
    r = json.loads(out.stdout)
    return r["median_us"], r["plan"]


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    exe = os.path.join(ROOT, "target", "release", "ternd")
    if not os.path.exists(exe):
        sys.exit("build it first: cargo build --release -p ternd")
    pkgs = sorted(p for p in glob.glob(os.path.join(ROOT, "firmware-updates", "models", "*"))
                  if os.path.exists(os.path.join(p, "tern-model.toml")) and not p.endswith("-broken"))
    pkgs += sorted(glob.glob(os.path.join(CACHE, "*")))
    print(f"release ternd, onnxruntime {ort.__version__} in Python, 1 thread, batch 1, "
          f"median µs of {runs} runs")
    head = f"{'package':<18}" + "".join(f"{p:>13}" for p in PLANS) + f"{'ort (py)':>10}  auto chose   auto/best"
    print(head)
    tract_best = {}
    for pkg in pkgs:
        name = os.path.basename(pkg)
        path, feed = golden_input(pkg)
        row, chosen = {}, "-"
        for plan in PLANS:
            us, note = tern_us(exe, pkg, path, plan, runs)
            row[plan] = us
            if plan == "auto" and us is not None:
                chosen = note
        tracts = [row[p] for p in PLANS if p.startswith("tract") and row[p] is not None]
        tract_best[name] = min(tracts) if tracts else None
        o = ort_us(pkg, feed, runs)
        best = min(x for x in (row["tract"], o) if x is not None)
        cells = "".join(f"{row[p]:>13.0f}" if row[p] is not None else f"{'refused':>13}" for p in PLANS)
        ratio = f"{row['auto'] / best:.2f}x" if row["auto"] is not None else "-"
        print(f"{name:<18}{cells}{o:>10.0f}  {chosen:<11} {ratio}")
    print("\nint8 against float, tract plans only (best of each):")
    for name, us in sorted(tract_best.items()):
        f32 = tract_best.get(name.replace("-int8", "-f32")) if name.endswith("-int8") else None
        if f32 is None:
            f32 = tract_best.get(name[:-5]) if name.endswith("-int8") else None
        if us is not None and f32:
            print(f"  {name:<18} {us:>8.0f} µs against {f32:>8.0f} µs: {us / f32:.2f}x")


if __name__ == "__main__":
    main()
