#!/usr/bin/env python3
"""How a model's time scales with threads inside one inference and with workers side by side.

Usage: python3 tests/bench/threads.py [RUNS]     (default 200 runs per measurement)
Needs a release ternd (`cargo build --release -p ternd`); the third-party packages from
tests/models/fetch-third-party.sh for PP-OCR's detector; ORT_DYLIB_PATH (or an installed
onnxruntime wheel) for the onnxruntime plan.

For each package and plan, `ternd infer --plan P --threads T --repeat RUNS --json` gives the
median latency with T = 1 and T = 2 (one request at a time: what a second intra-op thread buys
one request), then two processes with one thread each run at once (what a second worker buys:
two requests in parallel, each on a core). "speed-up" is the single-request latency ratio;
"2 workers" is the throughput of the two side by side against one alone.
"""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "tern", "third-party", "packages")
CASES = [
    (os.path.join(ROOT, "firmware-updates", "models", "digits-cnn-f32"), ["tract", "onnxruntime"]),
    (os.path.join(ROOT, "firmware-updates", "models", "digits-cnn-int8"),
     ["tract+float", "onnxruntime"]),
    (os.path.join(CACHE, "ppocr-det"), ["tract", "onnxruntime"]),
]


def golden(pkg):
    for g in ("0.npz", "0-input.npy"):
        p = os.path.join(pkg, "golden", g)
        if os.path.exists(p):
            return p
    sys.exit(f"{pkg}: no golden input")


def cmd(exe, pkg, plan, threads, runs):
    return [exe, "infer", "--model", pkg, "--input", golden(pkg), "--plan", plan,
            "--threads", str(threads), "--repeat", str(runs), "--json"]


def median(out):
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["median_us"]


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    exe = os.path.join(ROOT, "target", "release", "ternd")
    if not os.path.exists(exe):
        sys.exit("build it first: cargo build --release -p ternd")
    print(f"release ternd, {os.cpu_count()} CPUs, batch 1, median µs of {runs} runs")
    print(f"{'package':<17}{'plan':<13}{'1 thread':>10}{'2 threads':>11}{'speed-up':>10}"
          f"{'2 procs':>10}{'2 workers':>11}")
    for pkg, plans in CASES:
        if not os.path.exists(os.path.join(pkg, "tern-model.toml")):
            print(f"{os.path.basename(pkg):<17}(missing: run tests/models/fetch-third-party.sh)")
            continue
        for plan in plans:
            one = median(subprocess.run(cmd(exe, pkg, plan, 1, runs), capture_output=True, text=True))
            two = median(subprocess.run(cmd(exe, pkg, plan, 2, runs), capture_output=True, text=True))
            if one is None or two is None:
                print(f"{os.path.basename(pkg):<17}{plan:<13}{'refused':>10}")
                continue
            procs = [subprocess.Popen(cmd(exe, pkg, plan, 1, runs), stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
            side = []
            for p in procs:
                out, _ = p.communicate()
                side.append(json.loads(out.strip().splitlines()[-1])["median_us"])
            both = max(side)
            print(f"{os.path.basename(pkg):<17}{plan:<13}{one:>10}{two:>11}{one / two:>9.2f}x"
                  f"{both:>10}{2 * one / both:>10.2f}x")


if __name__ == "__main__":
    main()
