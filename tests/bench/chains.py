#!/usr/bin/env python3
"""The OCR chain and the VAD stream: tern's pipelines against onnxruntime in Python, same
inputs, same run, one thread each.

Usage: [TERN_BENCH_PLAN=auto] python3 tests/bench/chains.py [PACKAGES_DIR] [IMAGES]
  PACKAGES_DIR  what tests/models/fetch-third-party.sh printed (default: its default cache)
  IMAGES        rendered images for the OCR chain (default 24)
Needs a built ternd (target/release/ternd if present, else target/debug/ternd) and the fetch
script's Python (numpy, onnxruntime, Pillow): run it with that Python.

OCR: images from tests/models/render_text.py go through a running ternd's det -> cls (rotate) ->
rec pipeline on a watched folder. Per image, tern's time is the latency_us its result reports
for the detector plus each stage's time on the image's crops (decode, preprocess, run,
postprocess; cls and rec name their batch, so a stage runs an image's crops together); the
pipeline's throughput is images over the wall time from the first file taken to the last
result stored. onnxruntime runs the same three models (intra_op_num_threads = 1) on the same
images and on the crops tern cut (same boxes), batched the same way, with the preprocessing
done in numpy beforehand and not timed: only InferenceSession.run counts, so the ratio
flatters onnxruntime.
VAD: the fetch script's speech.wav through `ternd infer` (one stream, state carried), against
onnxruntime's run on the same windows with the state carried; the real-time factor is compute
time over the audio's length.
"""
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np
import onnxruntime as ort
from PIL import Image

# The plan ternd serves the OCR models with: `tract`, or `auto` (the fastest of those that pass,
# onnxruntime among them when ORT_DYLIB_PATH names its library).
PLAN = os.environ.get("TERN_BENCH_PLAN", "tract")
# The same ternd, cache and repository as the per-model bench (this script's folder).
from third_party import DEFAULT, ROOT, ternd  # noqa: E402


def session(pkg):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(os.path.join(pkg, "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])


def chw(img, w, h):
    """BGR, scaled to [-1, 1], NCHW: PP-OCR's preprocessing."""
    a = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
    a = (a[:, :, ::-1] / 255.0 - 0.5) / 0.5
    return a.transpose(2, 0, 1)[None].copy()


def up(n, m):
    return max(m, int(np.ceil(n / m)) * m)


def stage_ms(said):
    """What one stage spent on an image's crops, from their results: crops run together
    (`batch`) each report the time until their batch's answers were ready, all from one start,
    so the stage took the longest of them; crops run one by one took the sum."""
    lat = [s["latency_us"] for s in said]
    if not lat:
        return 0.0
    together = any("batch" in s for s in said)
    return (max(lat) if together else sum(lat)) / 1000


def batches(inputs, most=8):
    """[1, C, H, W] arrays stacked in batches of at most `most`, the narrowest together, each
    zero-padded on the right to its widest."""
    inputs = sorted(inputs, key=lambda x: x.shape[3])
    for i in range(0, len(inputs), most):
        group = inputs[i:i + most]
        w = max(x.shape[3] for x in group)
        out = np.zeros((len(group),) + group[0].shape[1:3] + (w,), dtype=np.float32)
        for k, x in enumerate(group):
            out[k, :, :, :x.shape[3]] = x[0]
        yield out


def timed(sess, feed):
    t = time.perf_counter()
    out = sess.run(None, feed)
    return (time.perf_counter() - t) * 1000, out


def ocr(packages, n, exe):
    tmp = tempfile.mkdtemp(prefix="tern-bench-ocr-")
    inbox = os.path.join(tmp, "inbox")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/models/render_text.py"), inbox,
                    str(n), "7"], check=True)
    os.remove(os.path.join(inbox, "truth.json"))
    pkg = {m: os.path.join(packages, m) for m in ("ppocr-det", "ppocr-cls", "ppocr-rec")}
    config = os.path.join(tmp, "ternd.toml")
    with open(config, "w") as f:
        f.write('state_dir = "state"\n[log]\nlevel = "warn"\n[dbus]\nbus = "none"\n')
        for m in ("ppocr-det", "ppocr-cls", "ppocr-rec"):
            f.write('[[models]]\npackage = "%s"\nplan = "%s"\n' % (pkg[m], PLAN))
        f.write('[[feeds]]\nkind = "directory"\nname = "inbox"\npath = "inbox"\n'
                'extensions = ["png"]\n[[pipelines]]\nname = "ocr"\nfeed = "inbox"\n'
                'model = "ppocr-det"\nmax_crops = 32\n[[pipelines.stages]]\n'
                'model = "ppocr-cls"\nrotate = true\n[[pipelines.stages]]\n'
                'model = "ppocr-rec"\n')
    proc = subprocess.Popen([exe, "run", "--config", config], stderr=subprocess.DEVNULL)
    db = os.path.join(tmp, "state", "tern.db")
    rows = []
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            c = sqlite3.connect(db)
            rows = c.execute("SELECT source, ts_ms, outputs FROM results ORDER BY id").fetchall()
            c.close()
        except sqlite3.Error:
            rows = []
        if len(rows) >= n:
            break
        time.sleep(0.2)
    done_ms = time.time() * 1000
    proc.terminate()
    proc.wait()
    if len(rows) < n:
        sys.exit("ternd read %d of %d images in time" % (len(rows), n))
    first_ms = min(r[1] for r in rows)
    det_s, cls_s, rec_s = session(pkg["ppocr-det"]), session(pkg["ppocr-cls"]), session(pkg["ppocr-rec"])
    tern = {"det": [], "cls": [], "rec": [], "image": []}
    onnx = {"det": [], "cls": [], "rec": [], "image": []}
    crops = 0
    for source, _, outputs in rows:
        o = json.loads(outputs)
        boxes = next(iter(o.values()))["boxes"]
        img = Image.open(os.path.join(inbox, source))
        # tern: what each result says each stage spent on each crop.
        stages = [b["stages"] for b in boxes if isinstance(b.get("stages"), list)]
        crops += len(stages)
        tern["cls"].append(stage_ms([s[0] for s in stages]))
        tern["rec"].append(stage_ms([s[1] for s in stages if len(s) > 1]))
        # onnxruntime: the same image and the same crops, preprocessed beforehand.
        s = min(1.0, 960 / max(img.width, img.height))
        w, h = min(960, up(img.width * s, 32)), min(960, up(img.height * s, 32))
        t_det, _ = timed(det_s, {"x": chw(img, w, h)})
        # As tern runs them (and rapidocr does): each stage on an image's crops at once, in
        # batches of at most 8, the recogniser's lines by width, zero-padded to the widest.
        cls_in, rec_in = [], []
        for b in boxes:
            if not isinstance(b.get("stages"), list):
                continue
            crop = img.crop((int(b["x0"]), int(b["y0"]), int(np.ceil(b["x1"])), int(np.ceil(b["y1"]))))
            cls_in.append(chw(crop, 192, 48))
            if b["stages"][0].get("turned") == 180:
                crop = crop.rotate(180)
            rw = min(1280, up(crop.width * 48 / max(1, crop.height), 8))
            rec_in.append(chw(crop, rw, 48))
        c_cls = sum(timed(cls_s, {"x": x})[0] for x in batches(cls_in))
        c_rec = sum(timed(rec_s, {"x": x})[0] for x in batches(rec_in))
        onnx["det"].append(t_det)
        onnx["cls"].append(c_cls)
        onnx["rec"].append(c_rec)
        onnx["image"].append(t_det + c_cls + c_rec)
    # tern's detector time: the result's own latency_us, from the row.
    c = sqlite3.connect(db)
    for (lat,) in c.execute("SELECT latency_us FROM results ORDER BY id"):
        tern["det"].append(lat / 1000)
    c.close()
    tern["image"] = [d + a + b for d, a, b in zip(tern["det"], tern["cls"], tern["rec"])]
    wall_s = (done_ms - first_ms) / 1000
    print("OCR chain, %d images, %d crops (%.1f per image), ternd %s, plan %s" % (
        n, crops, crops / n, os.path.relpath(exe, ROOT), PLAN))
    print("  %-18s %10s %14s %8s" % ("ms per image", "tern", "onnxruntime", "ratio"))
    for k in ("det", "cls", "rec", "image"):
        a, b = statistics.median(tern[k]), statistics.median(onnx[k])
        print("  %-18s %10.1f %14.1f %8.2f" % (k if k != "image" else "whole chain", a, b, a / b))
    print("  pipeline: %.2f images/s over %.1f s (file taken to last result stored, "
          "polled every 0.2 s)" % (n / wall_s, wall_s))


def vad(packages, exe):
    pkg = os.path.join(packages, "silero-vad")
    wav = os.path.join(os.path.dirname(packages), "testdata", "speech.wav")
    out = subprocess.run([exe, "infer", "--model", pkg, "--input", wav, "--json",
                          "--plan", "tract"], capture_output=True, check=True, text=True).stdout
    steps = [json.loads(l) for l in out.splitlines() if l.strip()]
    with wave.open(wav) as w:
        seconds = w.getnframes() / w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    tern_ms = sum(s["latency_us"] for s in steps) / 1000
    sess = session(pkg)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    padded = np.concatenate([np.zeros(64, np.float32), pcm, np.zeros(576, np.float32)])
    onnx_ms = 0.0
    for k in range(len(steps)):
        x = padded[k * 512:k * 512 + 576][None]
        t, (_, state) = timed(sess, {"input": x, "state": state, "sr": sr})
        onnx_ms += t
    print("VAD stream: %.1f s of audio, %d windows of 32 ms" % (seconds, len(steps)))
    print("  tern        %.1f ms compute, real-time factor %.4f (%.0f us a window)" % (
        tern_ms, tern_ms / 1000 / seconds, tern_ms * 1000 / len(steps)))
    print("  onnxruntime %.1f ms compute, real-time factor %.4f (%.0f us a window)" % (
        onnx_ms, onnx_ms / 1000 / seconds, onnx_ms * 1000 / len(steps)))
    print("  ratio tern / onnxruntime: %.2f" % (tern_ms / onnx_ms))


def main():
    packages = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    exe = ternd()
    ocr(packages, n, exe)
    vad(packages, exe)


if __name__ == "__main__":
    main()
