#!/usr/bin/env python3
"""Build tern model packages (format 2) and test data from third-party wheels.

Run by tests/models/fetch-third-party.sh, which finds a Python with numpy, onnxruntime, onnx
and Pillow >= 10.1 and downloads the wheels first:

    python3 tests/models/third_party.py CACHE_DIR

Reads   CACHE_DIR/wheels/{rapidocr_onnxruntime-1.4.4,silero_vad-6.2.3}-py3-none-any.whl
Writes  CACHE_DIR/packages/{ppocr-det,ppocr-cls,ppocr-cls-int8,ppocr-rec,silero-vad}/
        CACHE_DIR/testdata/{words/,page.png,page.json,speech.wav,speech.json}

Every directory is built beside its final place and renamed into it, so a killed run never
leaves half a package. Everything is rebuilt on every run from fixed inputs (fixed seeds,
fixed zip timestamps), so a rerun on the same machine writes the same bytes.

Each output is checked with onnxruntime (the rec model must read >= 95% of the words, the
detector must find one box per page line, the VAD must find the speech), and golden outputs
are compared with a second onnxruntime optimisation level; any failed check exits non-zero.
Progress and figures go to stderr; the last stdout line is the packages directory.
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
from collections import deque

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

# --- sources ---------------------------------------------------------------------------------

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
            "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SILERO = ("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
          "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")

DET_ONNX = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
CLS_ONNX = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC_ONNX = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
VAD_ONNX = "silero_vad/data/silero_vad_op18_ifless.onnx"

REC_CLASSES = 6625
# Selftest tolerance (max |difference| per output element). 2e-4 by default; the detector's
# deep sigmoid map moves by up to ~8e-5 between ORT optimisation levels alone, so it gets
# 1e-3 (over 10x what was measured). A build fails if the levels differ by over a quarter of
# a package's tolerance.
TOLERANCE = 2e-4
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
SPEECH_TEXT = "the quick brown fox jumps over the lazy dog"

# --- the four packages, as the manifest states them -------------------------------------------
# Each input spec is what tern reads from tern-model.toml; the preprocessing below implements
# it in numpy so that goldens and checks go through exactly what the manifest says.

INV255 = 1.0 / 255.0

DET = {
    "name": "ppocr-det", "version": "4.0.0", "src": RAPIDOCR, "member": DET_ONNX,
    "tolerance": 1e-3,
    "description": "PP-OCRv4 text detector (DB) from rapidocr-onnxruntime 1.4.4",
    "input": {"name": "x", "dtype": "f32", "shape": [1, 3, "H<=960", "W<=960"],
              "image": {"layout": "nchw", "color": "bgr", "resize": "fit", "multiple": 32,
                        "scale": INV255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
    "output": "sigmoid_0.tmp_0",
    "postprocess": {"kind": "text_boxes", "threshold": 0.3, "box_threshold": 0.5,
                    "unclip_ratio": 1.6, "min_size": 3},
}
CLS = {
    "name": "ppocr-cls", "version": "2.0.0", "src": RAPIDOCR, "member": CLS_ONNX,
    "description": "PP-OCR mobile v2.0 text-line orientation classifier (0/180) from "
                   "rapidocr-onnxruntime 1.4.4",
    "input": {"name": "x", "dtype": "f32", "shape": ["N<=8", 3, 48, 192],
              "image": {"layout": "nchw", "color": "bgr", "resize": "stretch",
                        "scale": INV255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
    "output": "save_infer_model/scale_0.tmp_1",
    "postprocess": {"kind": "classify", "softmax": False, "top_k": 2, "labels": ["0", "180"]},
}
REC = {
    "name": "ppocr-rec", "version": "4.0.0", "src": RAPIDOCR, "member": REC_ONNX,
    "description": "PP-OCRv4 text recogniser from rapidocr-onnxruntime 1.4.4",
    "input": {"name": "x", "dtype": "f32", "shape": ["N<=8", 3, 48, "W<=1280"],
              "image": {"layout": "nchw", "color": "bgr", "resize": "fit", "multiple": 8,
                        "scale": INV255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
    "output": "softmax_11.tmp_0",
    "postprocess": {"kind": "ctc", "charset": "charset.txt", "blank": 0},
}
# The classifier quantised to int8 here (QDQ, per-tensor, Conv and MatMul; Softmax and the rest
# kept float), as onnxruntime's tools quantise a model for the edge: tern's int8 path on a
# third-party model. Its tolerance is the int8 noise the plans may add to the reference.
CLS_INT8 = dict(CLS, name="ppocr-cls-int8", member=CLS_ONNX + "#qdq", tolerance=0.05,
                description="PP-OCR mobile v2.0 orientation classifier, int8 QDQ (quantised by "
                            "tests/models/third_party.py with onnxruntime's quantize_static)")
VAD = {
    "name": "silero-vad", "version": "6.2.3", "src": SILERO, "member": VAD_ONNX,
    "description": "Silero VAD v6 (op18, if-less graph) from silero-vad 6.2.3, 16 kHz",
}
VAD_RATE, VAD_WINDOW, VAD_CONTEXT = 16000, 512, 64


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fail(msg):
    log("third_party.py: FAILED: " + msg)
    sys.exit(1)


# --- small tools ------------------------------------------------------------------------------

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def session(data, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.graph_optimization_level = level
    o.log_severity_level = 3  # silero's graph has unused initializers ORT warns about
    return ort.InferenceSession(data, sess_options=o, providers=["CPUExecutionProvider"])


def write_npz(path, arrays):
    """An uncompressed .npz as np.savez writes it, but with fixed zip timestamps so that the
    bytes do not change between runs. Keys keep their order; np.load reads it back."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zi = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, buf.getvalue())


DTYPES = {"f32": np.dtype("<f4"), "i64": np.dtype("<i8")}


def place_dir(tmp, dest):
    """Move a finished directory into place; `dest` never holds a partial tree."""
    old = None
    if os.path.lexists(dest):
        old = "%s.old-%d" % (dest, os.getpid())
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old:
        shutil.rmtree(old)


def clean_stale(parent):
    for n in os.listdir(parent):
        if n.startswith(".tmp-") or ".old-" in n:
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for these (ASCII) values
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_table(header, d):
    lines = [header] if header else []
    lines += ["%s = %s" % (k, toml_value(v)) for k, v in d.items()]
    return "\n".join(lines) + "\n"


def median_ms(fn, runs=20, warm=3):
    for _ in range(warm):
        fn()
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        t.append(time.perf_counter() - s)
    return sorted(t)[runs // 2] * 1e3


# --- image preprocessing, as the manifest states it -------------------------------------------

def parse_dim(d):
    """Integer dim -> (None, n); "NAME<=N" -> (NAME, N); "NAME" -> (NAME, None)."""
    if isinstance(d, int):
        return None, d
    name, _, bound = d.partition("<=")
    return name, (int(bound) if bound else None)


def round_to(v, multiple, bound):
    r = max(multiple, int(round(v / multiple)) * multiple)
    if bound is not None:
        r = min(r, bound // multiple * multiple)
    return r


def target_size(spec, w, h):
    """(width, height) the image is resized to for an nchw input spec."""
    im = spec["image"]
    (hn, hv), (wn, wv) = parse_dim(spec["shape"][2]), parse_dim(spec["shape"][3])
    if im["resize"] == "stretch":
        assert hn is None and wn is None
        return wv, hv
    m = im.get("multiple", 1)
    if hn is None and wn is None:
        return wv, hv  # (letterboxing is not needed by these packages)
    if hn is None:
        return round_to(w * hv / h, m, wv), hv
    if wn is None:
        return wv, round_to(h * wv / w, m, hv)
    # both named: keep the image's own size unless a bound forces it down
    s = min(1.0, *(b / v for b, v in ((hv, h), (wv, w)) if b is not None))
    return round_to(w * s, m, wv), round_to(h * s, m, hv)


def preprocess(img, spec):
    im = spec["image"]
    assert im["layout"] == "nchw"
    img = img.convert("RGB")
    w, h = target_size(spec, *img.size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if im["color"] == "bgr":
        a = a[:, :, ::-1]
    a = a * np.float32(im["scale"])
    a = (a - np.array(im["mean"], np.float32)) / np.array(im["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None]).astype("<f4")


# --- rendering --------------------------------------------------------------------------------

def fonts():
    out = []
    for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        p = os.path.join(FONT_DIR, f)
        if os.path.exists(p):
            out.append((f, lambda size, p=p: ImageFont.truetype(p, size)))
    out.append(("load_default", lambda size: ImageFont.load_default(size=size)))
    return out


def ink_bbox(gray):
    """Ink bounding box (x0, y0, x1, y1), x1/y1 exclusive, of dark pixels on white."""
    return Image.eval(gray, lambda v: 255 - v).point(lambda v: 255 if v > 0 else 0).getbbox()


def render_word(word, font, margin=6):
    canvas = Image.new("L", (len(word) * font.size + 4 * margin + 40, font.size * 3), 255)
    ImageDraw.Draw(canvas).text((margin + 10, font.size // 2), word, fill=0, font=font)
    x0, y0, x1, y1 = ink_bbox(canvas)
    crop = canvas.crop((x0 - margin, y0 - margin, x1 + margin, y1 + margin))
    return crop.convert("RGB")


def render_page(width, height, lines):
    """lines: (x, y, text, font). Returns the RGB page and each line's ink box."""
    page = Image.new("L", (width, height), 255)
    boxes = []
    for x, y, text, font in lines:
        layer = Image.new("L", (width, height), 255)
        ImageDraw.Draw(layer).text((x, y), text, fill=0, font=font)
        boxes.append(list(ink_bbox(layer)))
        page = Image.fromarray(np.minimum(np.asarray(page), np.asarray(layer)))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[3] + 20 < b[1], "page lines must be at least 20 px apart"
    return page.convert("RGB"), boxes


# --- postprocessing used by the checks ---------------------------------------------------------

def ctc_decode(probs, charset, blank=0):
    idx = probs[0].argmax(axis=1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != blank:
            out.append(charset[i])
        prev = i
    return "".join(out)


def components(mask):
    """8-connected components of a bool mask -> list of (ys, xs) arrays."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, ys, xs = deque([(y0, x0)]), [], []
        while q:
            y, x = q.popleft()
            ys.append(y)
            xs.append(x)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
        comps.append((np.array(ys), np.array(xs)))
    return comps


def db_boxes(pred, pp):
    """A numpy DB postprocess for axis-aligned text: threshold -> components -> box ->
    mean-score filter -> unclip by area * ratio / perimeter. Boxes in map pixels."""
    p = pred[0, 0]
    out = []
    for ys, xs in components(p > pp["threshold"]):
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        w, h = float(x1 - x0), float(y1 - y0)
        if min(w, h) < pp["min_size"]:
            continue
        score = float(p[y0:y1 + 1, x0:x1 + 1].mean())
        if score < pp["box_threshold"]:
            continue
        d = w * h * pp["unclip_ratio"] / (2 * (w + h))
        out.append([x0 - d, y0 - d, x1 + d, y1 + d, score])
    return sorted(out, key=lambda b: b[1])


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --- packages ---------------------------------------------------------------------------------

class Builder:
    def __init__(self, cache):
        self.cache = cache
        self.wheels = {}
        for src in (RAPIDOCR, SILERO):
            path = os.path.join(cache, "wheels", src[2])
            if not os.path.exists(path):
                fail("missing wheel %s (run fetch-third-party.sh)" % path)
            got = sha256_file(path)
            if got != src[3]:
                fail("%s has sha256 %s, expected %s; delete it and rerun" % (path, got, src[3]))
            self.wheels[src[0]] = zipfile.ZipFile(path)
        self.models = {}
        self.figures = []
        self.tolerance_notes = []

    def model_bytes(self, pkg):
        key = pkg["member"]
        if key not in self.models:
            if key.endswith("#qdq"):
                self.models[key] = quantise_qdq(self.wheels[pkg["src"][0]].read(key[:-4]),
                                                self.calibration)
            else:
                self.models[key] = self.wheels[pkg["src"][0]].read(key)
        return self.models[key]

    def header(self, pkg):
        data = self.model_bytes(pkg)
        member = pkg["member"]
        how = "as shipped in that wheel"
        if member.endswith("#qdq"):
            member, how = member[:-4], "quantised to int8 (QDQ) by third_party.py"
        return ("# Generated by tests/models/fetch-third-party.sh from %s==%s; model.onnx is %s\n"
                "# %s (sha256 %s). Do not edit: rerun the script.\n"
                % (pkg["src"][0], pkg["src"][1], member, how, hashlib.sha256(data).hexdigest()))

    def check_goldens(self, pkg, cases):
        """Worst |difference| between goldens and a graph run without ORT's optimisations."""
        plain = session(self.model_bytes(pkg), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        worst = 0.0
        for feeds, outs in cases:
            got = plain.run(list(outs), feeds)
            for g, want in zip(got, outs.values()):
                worst = max(worst, float(np.abs(g.astype(np.float64) - want).max()))
        tol = pkg.get("tolerance", TOLERANCE)
        note = "%s: max |ORT_ENABLE_ALL - ORT_DISABLE_ALL| over goldens = %.3g (tolerance %g)" % (
            pkg["name"], worst, tol)
        self.tolerance_notes.append(note)
        log("  " + note)
        if worst > tol / 4:
            fail("%s: optimisation levels differ by %.3g, too close to the tolerance %g"
                 % (pkg["name"], worst, tol))

    def write_package(self, pkg, manifest, goldens, extra_files=None):
        parent = os.path.join(self.cache, "packages")
        tmp = tempfile.mkdtemp(prefix=".tmp-%s-" % pkg["name"], dir=parent)
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "model.onnx"), "wb") as f:
            f.write(self.model_bytes(pkg))
        os.mkdir(os.path.join(tmp, "golden"))
        for i, arrays in enumerate(goldens):
            write_npz(os.path.join(tmp, "golden", "%d.npz" % i), arrays)
        for name, data in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, "tern-model.toml"), "w", encoding="utf-8") as f:
            f.write(manifest)
        place_dir(tmp, os.path.join(parent, pkg["name"]))
        log("  wrote packages/%s (%d goldens)" % (pkg["name"], len(goldens)))

    def image_manifest(self, pkg, golden_count):
        inp = pkg["input"]
        m = self.header(pkg)
        m += toml_table(None, {"format": 2, "name": pkg["name"], "version": pkg["version"],
                               "description": pkg["description"],
                               "form": "int8" if pkg["name"].endswith("-int8") else "f32"})
        m += "\n" + toml_table("[[inputs]]", {k: inp[k] for k in ("name", "dtype", "shape")})
        m += toml_table("[inputs.image]", inp["image"])
        m += "\n" + toml_table("[[outputs]]", {"name": pkg["output"]})
        m += toml_table("[outputs.postprocess]", pkg["postprocess"])
        m += "\n" + toml_table("[selftest]", {
            "tolerance": pkg.get("tolerance", TOLERANCE),
            "golden": ["golden/%d.npz" % i for i in range(golden_count)]})
        return m

    def image_goldens(self, pkg, sess, images):
        goldens, cases = [], []
        for img in images:
            x = preprocess(img, pkg["input"])
            assert x.dtype == DTYPES[pkg["input"]["dtype"]]
            y = sess.run([pkg["output"]], {pkg["input"]["name"]: x})[0]
            assert y.dtype == np.dtype("<f4")
            goldens.append({"in/" + pkg["input"]["name"]: x, "out/" + pkg["output"]: y})
            cases.append(({pkg["input"]["name"]: x}, {pkg["output"]: y}))
        self.check_goldens(pkg, cases)
        return goldens, cases

    # ppocr-det ---------------------------------------------------------------------------------
    def det(self, testdata):
        pkg = DET
        sess = session(self.model_bytes(pkg))
        sans = ImageFont.truetype(os.path.join(FONT_DIR, "DejaVuSans.ttf"), 24) \
            if os.path.exists(os.path.join(FONT_DIR, "DejaVuSans.ttf")) \
            else ImageFont.load_default(size=24)
        serif = fonts()[1 % len(fonts())][1](22)
        p0, _ = render_page(512, 256, [(20, 30, "Edge inference with tract", sans),
                                       (20, 110, "ternd 2026", serif),
                                       (20, 180, "PP-OCRv4 detector golden", sans)])
        p1, _ = render_page(320, 320, [(16, 24, "hello world", serif),
                                       (16, 100, "0123456789", sans),
                                       (16, 180, "ONNX", sans),
                                       (16, 250, "quick brown fox", serif)])
        goldens, cases = self.image_goldens(pkg, sess, [p0, p1])
        for (feeds, _), g in zip(cases, goldens):
            assert feeds["x"].shape in ((1, 3, 256, 512), (1, 3, 320, 320))
        self.write_package(pkg, self.image_manifest(pkg, len(goldens)), goldens)

        # check: one box per line of the test page
        page = Image.open(os.path.join(testdata, "page.png"))
        truth = json.load(open(os.path.join(testdata, "page.json")))["lines"]
        x = preprocess(page, pkg["input"])
        sx, sy = page.size[0] / x.shape[3], page.size[1] / x.shape[2]
        pred = sess.run([pkg["output"]], {"x": x})[0]
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy, b[4]]
                 for b in db_boxes(pred, pkg["postprocess"])]
        log("  page %dx%d -> input %s: %d lines, %d boxes"
            % (page.size[0], page.size[1], list(x.shape), len(truth), len(boxes)))
        ok = len(boxes) == len(truth)
        for t, b in zip(truth, boxes):
            j = iou(t, b)
            slack = 4  # px of ink a box may leave out at a side (DB boxes hug the ink)
            inside = (b[0] <= t[0] + slack and b[1] <= t[1] + slack
                      and b[2] >= t[2] - slack and b[3] >= t[3] - slack)
            log("    line %s  box [%.0f, %.0f, %.0f, %.0f] score %.3f  IoU %.2f  covers ink: %s"
                % (t, b[0], b[1], b[2], b[3], b[4], j, inside))
            ok = ok and j > 0.5 and inside
        self.figures.append("det: page %s: %d/%d lines found, one box each: %s"
                            % (page.size, min(len(boxes), len(truth)), len(truth), ok))
        if not ok:
            fail("the detector does not find one box per line of page.png")
        self.latency(pkg, lambda: sess.run(None, {"x": x}), x.shape)

    # ppocr-cls ---------------------------------------------------------------------------------
    def cls(self, words, pkg=CLS):
        sess = session(self.model_bytes(pkg))
        labels = pkg["postprocess"]["labels"]
        pick = [w for w in words if 3.0 <= w[2].size[0] / w[2].size[1] <= 6.0][:3]
        images = [pick[0][2], pick[1][2].rotate(180), pick[2][2]]
        expect = ["0", "180", "0"]
        goldens, cases = self.image_goldens(pkg, sess, images)
        got = [labels[int(c[1][pkg["output"]].argmax())] for c in cases]
        log("  cls goldens %s: expected %s, got %s" % ([p[1] for p in pick], expect, got))
        if got != expect:
            fail("the orientation classifier gets its own goldens wrong")
        self.write_package(pkg, self.image_manifest(pkg, len(goldens)), goldens)
        # check on all words, both ways up
        right = total = 0
        for _, _, img in words:
            for im, want in ((img, "0"), (img.rotate(180), "180")):
                y = sess.run(None, {"x": preprocess(im, pkg["input"])})[0]
                right += labels[int(y.argmax())] == want
                total += 1
        self.figures.append("%s: %d/%d word images (upright and turned 180) classified right"
                            % (pkg["name"], right, total))
        log("  " + self.figures[-1])
        x = cases[0][0]["x"]
        self.latency(pkg, lambda: sess.run(None, {"x": x}), x.shape)

    # ppocr-rec ---------------------------------------------------------------------------------
    def rec(self, words):
        pkg = REC
        sess = session(self.model_bytes(pkg))
        meta = sess.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            fail("the rec model has no `character` metadata")
        # As rapidocr 1.4.4 builds it (ch_ppocr_rec/utils.py CTCLabelDecode.get_character):
        # the metadata's lines (str.splitlines), then " " appended, then "blank" inserted first.
        charset = ["blank"] + meta["character"].splitlines() + [" "]
        classes = sess.get_outputs()[0].shape[-1]
        if len(charset) != REC_CLASSES or classes != REC_CLASSES:
            fail("charset has %d entries and the model %s classes; expected %d"
                 % (len(charset), classes, REC_CLASSES))
        for c in charset:
            if "\n" in c or c == "":
                fail("charset entry %r cannot be one line of charset.txt" % c)
        charset_txt = ("\n".join(charset) + "\n").encode("utf-8")
        assert charset_txt.decode("utf-8").split("\n")[:-1] == charset

        by_width = sorted(words, key=lambda w: w[2].size[0] / w[2].size[1])
        images = [by_width[len(by_width) // 4][2], by_width[-2][2]]
        goldens, cases = self.image_goldens(pkg, sess, images)
        log("  rec goldens: inputs %s" % [list(c[0]["x"].shape) for c in cases])
        self.write_package(pkg, self.image_manifest(pkg, len(goldens)), goldens,
                           {"charset.txt": charset_txt})

        right, wrong = 0, []
        for fname, word, img in words:
            got = ctc_decode(sess.run(None, {"x": preprocess(img, pkg["input"])})[0], charset)
            if got == word:
                right += 1
            else:
                wrong.append("%s %r -> %r" % (fname, word, got))
        acc = right / len(words)
        self.figures.append("rec: %d/%d words read exactly (%.1f%%)%s"
                            % (right, len(words), 100 * acc,
                               "; misread: " + ", ".join(wrong) if wrong else ""))
        log("  " + self.figures[-1])
        if acc < 0.95:
            fail("the recogniser reads only %.1f%% of the words" % (100 * acc))
        x = cases[0][0]["x"]
        self.latency(pkg, lambda: sess.run(None, {"x": x}), x.shape)

    # silero-vad --------------------------------------------------------------------------------
    def vad(self, testdata):
        pkg = VAD
        sess = session(self.model_bytes(pkg))
        names = [i.name for i in sess.get_inputs()]
        if names != ["input", "sr", "state"] or \
                [o.name for o in sess.get_outputs()] != ["output", "stateN"]:
            fail("unexpected silero graph inputs/outputs %s" % names)
        audio, speech = read_speech(testdata)
        sr = np.array(VAD_RATE, dtype="<i8")

        def windows():
            ctx = np.zeros(VAD_CONTEXT, np.float32)
            for s in range(0, len(audio) - VAD_WINDOW + 1, VAD_WINDOW):
                x = np.concatenate([ctx, audio[s:s + VAD_WINDOW]])
                ctx = x[-VAD_CONTEXT:]
                yield s, x[None].astype("<f4")

        def run(x, state):
            out, state_n = sess.run(["output", "stateN"], {"input": x, "state": state, "sr": sr})
            return out, state_n

        zero = np.zeros((2, 1, 128), "<f4")
        probs, states, inputs = [], [zero], []
        for s, x in windows():
            out, st = run(x, states[-1])
            probs.append(float(out[0, 0]))
            states.append(st)
            inputs.append((s, x))

        # goldens: the first window from zeros; a window 0.25 s into the speech started afresh
        # (zero state, its real context); a window 0.5 s into the speech with the state carried
        # over every window before it
        a, b = speech[0]
        k1 = int((a + 0.25) * VAD_RATE) // VAD_WINDOW
        k2 = int((a + 0.5) * VAD_RATE) // VAD_WINDOW
        goldens, cases = [], []
        for k, state in ((0, zero), (k1, zero), (k2, states[k2])):
            x = inputs[k][1]
            out, st = run(x, state)
            assert out.dtype == np.dtype("<f4") and st.dtype == np.dtype("<f4")
            goldens.append({"in/input": x, "in/state": state, "out/output": out, "out/stateN": st})
            cases.append(({"input": x, "state": state, "sr": sr}, {"output": out, "stateN": st}))
        log("  vad goldens: windows %s, outputs %s"
            % ([0, k1, k2], ["%.4f" % c[1]["output"][0, 0] for c in cases]))
        self.check_goldens(pkg, cases)

        m = self.header(pkg)
        m += toml_table(None, {"format": 2, "name": pkg["name"], "version": pkg["version"],
                               "description": pkg["description"], "form": "f32"})
        m += "\n" + toml_table("[[inputs]]", {"name": "input", "dtype": "f32",
                                              "shape": [1, VAD_WINDOW + VAD_CONTEXT]})
        m += toml_table("[inputs.audio]", {"sample_rate": VAD_RATE, "window": VAD_WINDOW,
                                           "context": VAD_CONTEXT})
        m += "\n" + toml_table("[[inputs]]", {"name": "sr", "dtype": "i64", "shape": [],
                                              "value": VAD_RATE})
        m += "\n" + toml_table("[[inputs]]", {"name": "state", "dtype": "f32",
                                              "shape": [2, 1, 128]})
        m += "\n" + toml_table("[[outputs]]", {"name": "output"})
        m += toml_table("[outputs.postprocess]", {"kind": "score", "threshold": 0.5,
                                                  "hysteresis": 0.15})
        m += "\n" + toml_table("[[state]]", {"input": "state", "output": "stateN"})
        m += "\n" + toml_table("[selftest]", {
            "tolerance": TOLERANCE, "golden": ["golden/%d.npz" % i for i in range(len(goldens))]})
        self.write_package(pkg, m, goldens)

        # check: windows wholly inside the speech vs. wholly in the silences
        p = np.array(probs)
        starts = np.array([s for s, _ in inputs]) / VAD_RATE
        ends = starts + VAD_WINDOW / VAD_RATE
        inside = (starts >= a) & (ends <= b)
        silent = (ends <= a) | (starts >= b + 0.1)   # 0.1 s for the model to let go
        sp = float((p[inside] > 0.5).mean())
        si = float((p[silent] < 0.5).mean())
        fig = ("vad: %d windows in speech [%.3f, %.3f] s: %.1f%% > 0.5 (median %.3f); "
               "%d windows in the silences: %.1f%% < 0.5 (max %.3f; leading max %.3f, "
               "trailing max %.3f)"
               % (inside.sum(), a, b, 100 * sp, np.median(p[inside]), silent.sum(), 100 * si,
                  p[silent].max(), p[ends <= a].max(), p[starts >= b + 0.1].max()))
        self.figures.append(fig)
        log("  " + fig)
        if sp < 0.8 or si < 0.95:
            fail("the VAD does not separate the speech from the silences")
        x, st = inputs[k2][1], states[k2]
        self.latency(pkg, lambda: run(x, st), x.shape)

    def cls_int8(self, words):
        # Calibrated on the first 20 words both ways up; the goldens and checks use them all.
        self.calibration = [preprocess(im, CLS["input"]) for _, _, img in words[:20]
                            for im in (img, img.rotate(180))]
        self.cls(words, CLS_INT8)

    def latency(self, pkg, fn, shape):
        ms = median_ms(fn)
        line = "latency %s: %.2f ms (onnxruntime %s, 1 thread, median of 20, input %s)" % (
            pkg["name"], ms, ort.__version__, list(shape))
        self.figures.append(line)
        log("  " + line)


def quantise_qdq(model, calibration):
    """int8 QDQ form of a float model, as onnxruntime's quantize_static makes it."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    m = onnx.load_from_string(model)
    # Paddle's export keeps weights in Constant nodes, which the quantiser does not see as
    # weights: make them initializers first.
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x} for x in calibration])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "int8.onnx")
        onnx.save(m, src)
        # Per-tensor: the model's opset (10) has no per-channel DequantizeLinear.
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul"], per_channel=False)
        with open(dst, "rb") as f:
            return f.read()


# --- test data --------------------------------------------------------------------------------

WORDS = [
    "hello", "World", "2026", "edge", "Inference", "tensor", "daemon", "Model", "quick",
    "brown", "fox", "jumps", "lazy", "dog", "Paris", "London", "river", "mountain", "keyboard",
    "window", "42", "1984", "coffee", "Tuesday", "network", "battery", "Sensor", "camera",
    "garden", "yellow", "purple", "Orange", "kitchen", "station", "Market", "summer", "winter",
    "pocket", "internationalization", "configuration", "temperature", "photograph",
    "Wednesday", "December", "elephant", "umbrella", "2048", "365", "bicycle", "Thursday",
]
SIZES = [20, 24, 28, 32, 36, 40, 22, 26, 30, 34, 38]


def make_words(dest):
    os.mkdir(os.path.join(dest, "words"))
    fs = fonts()
    out, tsv = [], []
    for i, word in enumerate(WORDS):
        fname, make = fs[i % len(fs)]
        size = SIZES[i % len(SIZES)]
        img = render_word(word, make(size))
        name = "%02d.png" % i
        img.save(os.path.join(dest, "words", name))
        out.append((name, word, img))
        tsv.append("%s\t%s\n" % (name, word))
    with open(os.path.join(dest, "words", "words.tsv"), "w") as f:
        f.writelines(tsv)
    log("  words: %d images, fonts %s, sizes %d-%d px"
        % (len(out), [f for f, _ in fs], min(SIZES), max(SIZES)))
    return out


def make_page(dest):
    fs = dict(fonts())
    sans = fs.get("DejaVuSans.ttf", fs["load_default"])
    serif = fs.get("DejaVuSerif.ttf", fs["load_default"])
    mono = fs.get("DejaVuSansMono.ttf", fs["load_default"])
    lines = [(40, 40, "Third-party models on the edge", sans(28)),
             (40, 120, "tern 2026", serif(32)),
             (60, 200, "The quick brown fox jumps over the lazy dog.", sans(20)),
             (40, 270, "0123456789", mono(26)),
             (300, 340, "short", serif(24)),
             (40, 410, "A longer line of text, set in a smaller size", sans(18))]
    page, boxes = render_page(640, 480, lines)
    page.save(os.path.join(dest, "page.png"))
    with open(os.path.join(dest, "page.json"), "w") as f:
        json.dump({"lines": boxes}, f)
        f.write("\n")
    log("  page: 640x480, %d lines" % len(boxes))


def resample(x, src, dst):
    """Band-limit to 0.45 * dst with a windowed sinc, then interpolate linearly."""
    taps = 129
    n = np.arange(taps) - (taps - 1) / 2
    fc = 0.45 * dst / src
    h = 2 * fc * np.sinc(2 * fc * n) * np.blackman(taps)
    y = np.convolve(x, h / h.sum(), mode="same")
    t = np.arange(int(len(x) * dst / src)) * (src / dst)
    return np.interp(t, np.arange(len(x)), y)


def make_speech(dest):
    espeak = shutil.which("espeak-ng")
    if not espeak:
        fail("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "espeak.wav")
        subprocess.run([espeak, "-v", "en", "-w", raw, SPEECH_TEXT], check=True,
                       stdout=subprocess.DEVNULL)
        with wave.open(raw) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    if rate != VAD_RATE:
        x = resample(x, rate, VAD_RATE)
    # trim espeak's own leading/trailing near-silence: 10 ms frames under 1% of the peak RMS
    f = 160
    rms = np.sqrt(np.mean(x[: len(x) // f * f].reshape(-1, f) ** 2, axis=1))
    loud = np.nonzero(rms > 0.01 * rms.max())[0]
    x = x[loud[0] * f:(loud[-1] + 1) * f]
    x *= 0.5 * 32767 / np.abs(x).max()          # peak at -6 dBFS
    rng = np.random.default_rng(20260101)
    pre, post = VAD_RATE, VAD_RATE              # 1.0 s each side
    noise = lambda n: rng.integers(-30, 31, n).astype(np.float64)
    lead = np.concatenate([np.zeros(VAD_RATE // 4), noise(pre - VAD_RATE // 4)])
    tail = np.concatenate([noise(post - VAD_RATE // 4), np.zeros(VAD_RATE // 4)])
    audio = np.concatenate([lead, x, tail])
    pcm = np.clip(np.round(audio), -32768, 32767).astype("<i2")
    with wave.open(os.path.join(dest, "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(VAD_RATE)
        w.writeframes(pcm.tobytes())
    start, end = pre / VAD_RATE, (pre + len(x)) / VAD_RATE
    with open(os.path.join(dest, "speech.json"), "w") as f:
        json.dump({"sample_rate": VAD_RATE, "speech": [[round(start, 4), round(end, 4)]]}, f)
        f.write("\n")
    log("  speech: %.2f s, speech at [%.3f, %.3f] s (espeak-ng at %d Hz, resampled)"
        % (len(pcm) / VAD_RATE, start, end, rate))


def read_speech(testdata):
    with wave.open(os.path.join(testdata, "speech.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (VAD_RATE, 1, 2)
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    return audio, json.load(open(os.path.join(testdata, "speech.json")))["speech"]


def load_words(testdata):
    out = []
    with open(os.path.join(testdata, "words", "words.tsv")) as f:
        for line in f:
            name, word = line.rstrip("\n").split("\t")
            out.append((name, word, Image.open(os.path.join(testdata, "words", name)).convert("RGB")))
    return out


# --- main -------------------------------------------------------------------------------------

def main():
    if len(sys.argv) != 2:
        fail("usage: third_party.py CACHE_DIR")
    cache = os.path.abspath(sys.argv[1])
    t0 = time.perf_counter()
    log("third_party.py: python %s, numpy %s, onnxruntime %s, Pillow %s"
        % (sys.version.split()[0], np.__version__, ort.__version__, Image.__version__))
    b = Builder(cache)
    for d in ("packages", "testdata"):
        os.makedirs(os.path.join(cache, d), exist_ok=True)
    clean_stale(os.path.join(cache, "packages"))
    clean_stale(cache)

    log("test data:")
    tmp = tempfile.mkdtemp(prefix=".tmp-testdata-", dir=cache)
    os.chmod(tmp, 0o755)
    make_words(tmp)
    make_page(tmp)
    make_speech(tmp)
    testdata = os.path.join(cache, "testdata")
    place_dir(tmp, testdata)
    words = load_words(testdata)  # check what was written, as a reader will see it

    log("ppocr-rec:")
    b.rec(words)
    log("ppocr-cls:")
    b.cls(words)
    log("ppocr-cls-int8:")
    b.cls_int8(words)
    log("ppocr-det:")
    b.det(testdata)
    log("silero-vad:")
    b.vad(testdata)

    log("summary:")
    for line in b.figures + b.tolerance_notes:
        log("  " + line)
    log("third_party.py: done in %.1f s" % (time.perf_counter() - t0))
    print(os.path.join(cache, "packages"))


if __name__ == "__main__":
    main()
