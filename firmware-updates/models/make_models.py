#!/usr/bin/env python3
"""Build tern's reference model packages from data that ships inside scikit-learn.

Every number here comes from a fixed seed, so running the script twice writes the same
packages. Nothing is downloaded: `load_digits` and `load_iris` are bundled with scikit-learn.

For each model it writes a float32 form and an int8 form that tract runs correctly, plus an
int8 form that tract runs *wrongly* (default QDQ quantises Softmax; tract then answers 1.0 for
every class). That last one is a test fixture: tern's load-time self-test must refuse it.

The int8 forms use QOperator quantisation of Conv and MatMul only (QLinearConv /
QLinearMatMul), which tract runs correctly; QGemm/QLinearAdd (from Gemm or a full op set) do
not load in tract, which is why the graphs use MatMul+Add rather than Gemm. On x86, tract runs
every int8 form tried (QOperator, QDQ, dynamic) 13-16x slower than float for this CNN; the
README's performance section has the figures.

Outputs (relative to this file):
  <model>-<form>/model.onnx, tern-model.toml, golden/*.npy   the model packages
  testsets/*.npy                                             held-out inputs and labels
  digits-det-<form>/, testsets/digits-det/*.png,              a digit detector (format 2,
    testsets/digits-det-boxes.json                            `detect`), held-out canvases, their
                                                             true boxes and onnxruntime's boxes
  accuracy.json                                              onnxruntime accuracy per package
  ../../configs/demo/inbox/*.png|jpg                         demo images (true label in name)
"""

import json
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                      QuantType, quantize_static)
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SEED = 20261128
OPSET = 17
GOLDEN_COUNT = 4


# ---------------------------------------------------------------- data

def digits_pixels():
    """Digits as the 8-bit grayscale images a camera would deliver (0..255)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    pix = np.round(d.data.reshape(-1, 8, 8) * 255.0 / 16.0).astype(np.uint8)
    return train_test_split(pix, d.target, test_size=0.2, random_state=0, stratify=d.target)


def mlp_input(pix):
    # What tern's preprocessing produces for an 8x8 gray image: value / 255, flattened.
    return (pix.astype(np.float32) / 255.0).reshape(len(pix), 64)


def cnn_input(pix):
    # What tern's preprocessing produces for an 8x8 gray image with resize to 32x32 (nearest)
    # and color = "rgb": each pixel becomes a 4x4 block, replicated in 3 channels.
    x = pix.astype(np.float32) / 255.0
    x = x.repeat(4, axis=1).repeat(4, axis=2)
    return np.repeat(x[:, None, :, :], 3, axis=1)


# ---------------------------------------------------------------- training

def train_cnn(x, y, epochs=10, batch=32, lr=1e-3):
    """Conv(3->32, 3x3) + ReLU, Flatten, Dense 64 + ReLU, Dropout 0.25, Dense 10, Softmax.

    Plain numpy with Adam: the architecture is small enough that an im2col convolution trains
    in well under a minute, and it keeps torch out of the requirements.
    """
    rng = np.random.default_rng(SEED)
    n = len(x)
    params = {
        "cw": rng.normal(0, np.sqrt(2 / 27), (32, 27)).astype(np.float32),
        "cb": np.zeros(32, np.float32),
        "w1": rng.normal(0, np.sqrt(2 / 28800), (28800, 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": rng.normal(0, np.sqrt(2 / 64), (64, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    step = 0

    def im2col(xb):
        # (B,3,32,32) -> (B,900,27), patch order (c, ky, kx) to match ONNX Conv weights.
        cols = np.empty((len(xb), 30, 30, 3, 3, 3), np.float32)
        for ky in range(3):
            for kx in range(3):
                cols[:, :, :, :, ky, kx] = xb[:, :, ky:ky + 30, kx:kx + 30].transpose(0, 2, 3, 1)
        return cols.reshape(len(xb), 900, 27)

    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            xb, yb = x[idx], y[idx]
            bsz = len(idx)
            cols = im2col(xb)
            conv = cols @ params["cw"].T + params["cb"]          # (B,900,32)
            convr = np.maximum(conv, 0)
            flat = convr.transpose(0, 2, 1).reshape(bsz, 28800)  # channel-major like Flatten
            h = flat @ params["w1"] + params["b1"]
            hr = np.maximum(h, 0)
            mask = (rng.random(hr.shape) >= 0.25).astype(np.float32) / 0.75
            hd = hr * mask
            logits = hd @ params["w2"] + params["b2"]
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            g = p.copy()
            g[np.arange(bsz), yb] -= 1
            g /= bsz
            grads = {"w2": hd.T @ g, "b2": g.sum(0)}
            dh = (g @ params["w2"].T) * mask * (h > 0)
            grads["w1"] = flat.T @ dh
            grads["b1"] = dh.sum(0)
            dflat = dh @ params["w1"].T
            dconv = dflat.reshape(bsz, 32, 900).transpose(0, 2, 1) * (conv > 0)
            grads["cw"] = np.einsum("bpc,bpk->ck", dconv, cols)
            grads["cb"] = dconv.sum((0, 1))
            step += 1
            for k in params:
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
                mh = m[k] / (1 - 0.9 ** step)
                vh = v[k] / (1 - 0.999 ** step)
                params[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        print(f"  cnn epoch {epoch + 1}/{epochs}", file=sys.stderr)
    return params


# ---------------------------------------------------------------- ONNX graphs

def dense_graph(name, layers, in_features, n_classes):
    """MatMul+Add(+Relu) stack ending in Softmax; layers = [(W, b), ...]."""
    nodes, inits = [], []
    cur = "input"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"fc{i}"])]
        cur = f"fc{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"relu{i}"]))
            cur = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [cur], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes])],
        inits)
    return finish(graph)


def cnn_graph(p):
    inits = [
        numpy_helper.from_array(p["cw"].reshape(32, 3, 3, 3), "conv_w"),
        numpy_helper.from_array(p["cb"], "conv_b"),
        numpy_helper.from_array(p["w1"], "w1"),
        numpy_helper.from_array(p["b1"], "b1"),
        numpy_helper.from_array(p["w2"], "w2"),
        numpy_helper.from_array(p["b2"], "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["conv_relu"]),
        helper.make_node("Flatten", ["conv_relu"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["fc1"]),
        helper.make_node("Relu", ["fc1"], ["fc1_relu"]),
        helper.make_node("MatMul", ["fc1_relu", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        inits)
    return finish(graph)


def finish(graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tern make_models.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- quantisation

class Calib(CalibrationDataReader):
    def __init__(self, x):
        self.rows = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.rows, None)


def quantize(fp32_path, out_path, calib, broken):
    if broken:
        # Default QDQ over every op: Softmax output gets quantised too. onnxruntime runs it
        # fine; tract answers 1.0 everywhere (FINDINGS.md). Kept only as a refusal fixture.
        quantize_static(fp32_path, out_path, Calib(calib), quant_format=QuantFormat.QDQ)
    else:
        quantize_static(fp32_path, out_path, Calib(calib), quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=["Conv", "MatMul"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


# ---------------------------------------------------------------- detector

DET_SIDE = 96      # canvas and model input, pixels
DET_STRIDE = 8     # one grid cell per 8x8 pixels: a 12x12 grid
DET_GRID = DET_SIDE // DET_STRIDE
DET_ANCHOR = 16.0  # box side the size outputs are relative to
DET_WINDOW = 24    # each cell sees 24x24 pixels around it: any digit centred in it


def det_canvases(pix, labels, count, rng):
    """Canvases of 1-3 digits, each scaled to 12-20 px, at random places without overlap.
    Returns images (count, 96, 96) uint8 and per image a list of (x0, y0, x1, y1, class)."""
    images = np.zeros((count, DET_SIDE, DET_SIDE), np.uint8)
    boxes = []
    for n in range(count):
        placed = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(20):
                side = int(rng.integers(12, 21))
                x0 = int(rng.integers(0, DET_SIDE - side + 1))
                y0 = int(rng.integers(0, DET_SIDE - side + 1))
                if all(x0 >= b[2] or b[0] >= x0 + side or y0 >= b[3] or b[1] >= y0 + side
                       for b in placed):
                    i = int(rng.integers(0, len(pix)))
                    patch = Image.fromarray(pix[i]).resize((side, side), Image.BILINEAR)
                    images[n, y0:y0 + side, x0:x0 + side] = np.asarray(patch)
                    placed.append((x0, y0, x0 + side, y0 + side, int(labels[i])))
                    break
        boxes.append(placed)
    return images, boxes


def det_im2col(x):
    """(B, 96, 96) in 0..1 -> (B, 144, 576): each cell's 24x24 window (zero padding 8)."""
    pad = (DET_WINDOW - DET_STRIDE) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (DET_WINDOW, DET_WINDOW), axis=(1, 2))
    win = win[:, ::DET_STRIDE, ::DET_STRIDE]  # (B, 12, 12, 24, 24)
    return np.ascontiguousarray(win).reshape(len(x), DET_GRID * DET_GRID, DET_WINDOW ** 2)


def det_targets(boxes):
    """Per cell: objectness, centre offset in the cell (x, y), log size / anchor (w, h), class."""
    b = len(boxes)
    t = np.zeros((b, DET_GRID * DET_GRID, 6), np.float32)
    for n, placed in enumerate(boxes):
        for (x0, y0, x1, y1, c) in placed:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            gx, gy = int(cx // DET_STRIDE), int(cy // DET_STRIDE)
            cell = gy * DET_GRID + gx
            t[n, cell] = [1, cx / DET_STRIDE - gx, cy / DET_STRIDE - gy,
                          np.log((x1 - x0) / DET_ANCHOR), np.log((y1 - y0) / DET_ANCHOR), c]
    return t


def train_det(images, boxes, epochs=40, batch=32, lr=2e-3):
    """A YOLO-style grid detector: Conv(1->128, 24x24, stride 8, pad 8) + ReLU, 1x1 conv to
    64 + ReLU, 1x1 conv to 15 raw outputs per cell (x, y, w, h, objectness, 10 classes).
    Plain numpy with Adam, like the CNN."""
    rng = np.random.default_rng(SEED + 1)
    k = DET_WINDOW ** 2
    params = {
        "w1": rng.normal(0, np.sqrt(2 / k), (k, 128)).astype(np.float32),
        "b1": np.zeros(128, np.float32),
        "w2": rng.normal(0, np.sqrt(2 / 128), (128, 64)).astype(np.float32),
        "b2": np.zeros(64, np.float32),
        "w3": rng.normal(0, np.sqrt(1 / 64), (64, 15)).astype(np.float32),
        "b3": np.zeros(15, np.float32),
    }
    m = {key: np.zeros_like(val) for key, val in params.items()}
    v = {key: np.zeros_like(val) for key, val in params.items()}
    x_all = det_im2col(images.astype(np.float32) / 255.0)
    t_all = det_targets(boxes)
    step = 0

    def sig(z):
        # exp overflows to inf for very negative logits; 1 / inf is the right 0.
        with np.errstate(over="ignore"):
            return 1 / (1 + np.exp(-z))

    for epoch in range(epochs):
        order = rng.permutation(len(images))
        total = 0.0
        for s0 in range(0, len(order), batch):
            idx = order[s0:s0 + batch]
            cols = x_all[idx].reshape(-1, k)            # (B*144, 576)
            t = t_all[idx].reshape(-1, 6)
            h1 = cols @ params["w1"] + params["b1"]
            r1 = np.maximum(h1, 0)
            h2 = r1 @ params["w2"] + params["b2"]
            r2 = np.maximum(h2, 0)
            out = r2 @ params["w3"] + params["b3"]      # (B*144, 15)
            pos = t[:, 0] > 0
            npos = max(pos.sum(), 1)
            g = np.zeros_like(out)
            # Objectness: binary cross-entropy over every cell.
            so = sig(out[:, 4])
            g[:, 4] = (so - t[:, 0]) / len(idx)
            total += float(-np.mean(t[:, 0] * np.log(so + 1e-7) + (1 - t[:, 0]) * np.log(1 - so + 1e-7)))
            # Box and class only where a digit is centred.
            sxy = sig(out[:, 0:2])
            g[:, 0:2] = 5 * 2 * (sxy - t[:, 1:3]) * sxy * (1 - sxy) * pos[:, None] / npos
            g[:, 2:4] = 5 * 2 * (out[:, 2:4] - t[:, 3:5]) * pos[:, None] / npos
            logits = out[:, 5:] - out[:, 5:].max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            onehot = np.zeros_like(p)
            onehot[np.arange(len(p)), t[:, 5].astype(int)] = 1
            g[:, 5:] = (p - onehot) * pos[:, None] / npos
            grads = {"w3": r2.T @ g, "b3": g.sum(0)}
            d2 = (g @ params["w3"].T) * (h2 > 0)
            grads["w2"], grads["b2"] = r1.T @ d2, d2.sum(0)
            d1 = (d2 @ params["w2"].T) * (h1 > 0)
            grads["w1"], grads["b1"] = cols.T @ d1, d1.sum(0)
            step += 1
            for key in params:
                m[key] = 0.9 * m[key] + 0.1 * grads[key]
                v[key] = 0.999 * v[key] + 0.001 * grads[key] ** 2
                mh = m[key] / (1 - 0.9 ** step)
                vh = v[key] / (1 - 0.999 ** step)
                params[key] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if (epoch + 1) % 10 == 0:
            print(f"  det epoch {epoch + 1}/{epochs} objectness loss {total / (len(order) / batch):.4f}",
                  file=sys.stderr)
    return params


def det_graph(p):
    """The trained detector with YOLO decoding in the graph: one row per cell,
    [cx, cy, w, h, objectness, p0..p9] in input pixels."""
    cells = DET_GRID * DET_GRID
    gy, gx = np.mgrid[0:DET_GRID, 0:DET_GRID]
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)[None]  # (1, 144, 2)
    pad = (DET_WINDOW - DET_STRIDE) // 2
    inits = [
        numpy_helper.from_array(p["w1"].T.reshape(128, 1, DET_WINDOW, DET_WINDOW), "w1"),
        numpy_helper.from_array(p["b1"], "b1"),
        numpy_helper.from_array(p["w2"].T.reshape(64, 128, 1, 1).copy(), "w2"),
        numpy_helper.from_array(p["b2"], "b2"),
        numpy_helper.from_array(p["w3"].T.reshape(15, 64, 1, 1).copy(), "w3"),
        numpy_helper.from_array(p["b3"], "b3"),
        numpy_helper.from_array(np.array([1, cells, 15], np.int64), "rows_shape"),
        numpy_helper.from_array(grid, "grid"),
        numpy_helper.from_array(np.array(DET_STRIDE, np.float32), "stride"),
        numpy_helper.from_array(np.array(DET_ANCHOR, np.float32), "anchor"),
    ]
    for name, lo, hi in (("xy", 0, 2), ("wh", 2, 4), ("obj", 4, 5), ("cls", 5, 15)):
        inits += [numpy_helper.from_array(np.array([lo], np.int64), f"{name}_start"),
                  numpy_helper.from_array(np.array([hi], np.int64), f"{name}_end")]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "last_axis"))
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[DET_WINDOW] * 2,
                         strides=[DET_STRIDE] * 2, pads=[pad] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["raw"], kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["raw"], ["raw_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["raw_t", "rows_shape"], ["rows"]),
    ]
    for name in ("xy", "wh", "obj", "cls"):
        nodes.append(helper.make_node("Slice", ["rows", f"{name}_start", f"{name}_end", "last_axis"],
                                      [f"{name}_raw"]))
    nodes += [
        helper.make_node("Sigmoid", ["xy_raw"], ["xy_sig"]),
        helper.make_node("Add", ["xy_sig", "grid"], ["xy_cell"]),
        helper.make_node("Mul", ["xy_cell", "stride"], ["xy"]),
        helper.make_node("Exp", ["wh_raw"], ["wh_exp"]),
        helper.make_node("Mul", ["wh_exp", "anchor"], ["wh"]),
        helper.make_node("Sigmoid", ["obj_raw"], ["obj"]),
        helper.make_node("Softmax", ["cls_raw"], ["cls"], axis=-1),
        helper.make_node("Concat", ["xy", "wh", "obj", "cls"], ["detections"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "digits-det",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, DET_SIDE, DET_SIDE])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, cells, 15])],
        inits)
    return finish(graph)


def det_postprocess(rows, score_threshold=0.25, iou_threshold=0.45, max_boxes=20):
    """The `detect` postprocessor (format "yolo") in numpy, as tern documents it: score =
    objectness x best class, threshold, class-aware NMS by score, at most max_boxes, corners
    clamped to the image."""
    corners = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                        rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], 1)
    # Boxes are reported inside the image (NMS still compares them as the model gave them).
    clipped = np.clip(corners, 0, DET_SIDE)
    scores = rows[:, 4:5] * rows[:, 5:]
    cls = scores.argmax(1)
    best = scores[np.arange(len(rows)), cls]
    order = [i for i in np.argsort(-best, kind="stable") if best[i] >= score_threshold]
    kept = []
    for i in order:
        if len(kept) >= max_boxes:
            break
        if all(cls[j] != cls[i] or iou(corners[i], corners[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return [[float(v) for v in clipped[i]] + [float(best[i]), int(cls[i])] for i in kept]


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mean_ap(predictions, truths, classes=10, threshold=0.5):
    """mAP@0.5: per class, detections over all images by score, each matched to an unmatched
    true box with IoU >= 0.5; all-point interpolated AP; mean over classes with a true box."""
    aps = []
    for c in range(classes):
        dets = [(d[4], n, d[:4]) for n, ds in enumerate(predictions) for d in ds if d[5] == c]
        dets.sort(key=lambda d: -d[0])
        gts = {n: [t[:4] for t in ts if t[4] == c] for n, ts in enumerate(truths)}
        total = sum(len(g) for g in gts.values())
        if total == 0:
            continue
        used = {n: [False] * len(g) for n, g in gts.items()}
        tp = []
        for _, n, box in dets:
            scores_ = [iou(box, g) for g in gts[n]]
            j = int(np.argmax(scores_)) if scores_ else -1
            if j >= 0 and scores_[j] >= threshold and not used[n][j]:
                used[n][j] = True
                tp.append(1)
            else:
                tp.append(0)
        tp = np.array(tp, np.float64)
        ctp = np.cumsum(tp)
        recall = ctp / total
        precision = ctp / np.arange(1, len(tp) + 1)
        r = np.concatenate([[0], recall, [1]])
        pr = np.concatenate([[0], precision, [0]])
        for i in range(len(pr) - 2, -1, -1):
            pr[i] = max(pr[i], pr[i + 1])
        aps.append(float(np.sum((r[1:] - r[:-1]) * pr[1:])))
    return float(np.mean(aps))


def build_detector(accuracy, tmp):
    """digits-det-f32 and -int8 (format 2, `detect`), held-out canvases as PNGs with their true
    boxes, and the boxes onnxruntime + det_postprocess give for each."""
    pix_tr, pix_te, y_tr, y_te = digits_pixels()
    rng = np.random.default_rng(SEED + 2)
    train_img, train_boxes = det_canvases(pix_tr, y_tr, 4000, rng)
    test_img, test_boxes = det_canvases(pix_te, y_te, 100, rng)
    params = train_det(train_img, train_boxes)
    fp32_path = os.path.join(tmp, "digits-det.onnx")
    onnx.save(det_graph(params), fp32_path)
    q_path = os.path.join(tmp, "digits-det-int8.onnx")
    calib = (train_img[:200, None].astype(np.float32) / 255.0)
    quantize_static(fp32_path, q_path, Calib(calib), quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["Conv"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    sets = os.path.join(HERE, "testsets", "digits-det")
    if os.path.exists(sets):
        shutil.rmtree(sets)
    os.makedirs(sets)
    for n, img in enumerate(test_img):
        Image.fromarray(img).save(os.path.join(sets, f"{n:03}.png"), optimize=True)
    reference = {"truth": [[list(b) for b in bs] for bs in test_boxes]}
    labels = [str(i) for i in range(10)]
    for form, path, tol in (("f32", fp32_path, 1e-4), ("int8", q_path, 5e-2)):
        name = f"digits-det-{form}"
        pkg = os.path.join(HERE, name)
        if os.path.exists(pkg):
            shutil.rmtree(pkg)
        os.makedirs(os.path.join(pkg, "golden"))
        shutil.copy(path, os.path.join(pkg, "model.onnx"))
        sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), providers=["CPUExecutionProvider"])
        preds = []
        for img in test_img:
            x = img[None, None].astype(np.float32) / 255.0
            rows = sess.run(["detections"], {"input": x})[0][0]
            preds.append(det_postprocess(rows))
        reference[form] = preds
        acc = mean_ap(preds, test_boxes)
        accuracy[f"{name} mAP@0.5"] = acc
        for i in range(2):
            x = test_img[i][None, None].astype(np.float32) / 255.0
            y = sess.run(["detections"], {"input": x})[0]
            write_npz(os.path.join(pkg, "golden", f"{i}.npz"),
                      {"in/input": x, "out/detections": y.astype(np.float32)})
        lines = [
            "# Generated by firmware-updates/models/make_models.py; edit the script, not this file.",
            "format = 2",
            f'name = "{name}"',
            'version = "1.0.0"',
            f'description = "digit detector on 96x96 gray, YOLO-style 12x12 grid ({form})"',
            f'form = "{form}"',
            "",
            "[[inputs]]",
            'name = "input"',
            'dtype = "f32"',
            f"shape = [1, 1, {DET_SIDE}, {DET_SIDE}]",
            "[inputs.image]",
            'layout = "nchw"',
            'color = "gray"',
            'resize = "letterbox"',
            "pad = 0",
            'filter = "triangle"',
            f"scale = {1.0 / 255.0!r}",
            "",
            "[[outputs]]",
            'name = "detections"',
            "[outputs.postprocess]",
            'kind = "detect"',
            'format = "yolo"',
            "score_threshold = 0.25",
            "iou_threshold = 0.45",
            "max_boxes = 20",
            f"labels = {toml_list(labels)}",
            "",
            "[selftest]",
            f"tolerance = {tol}",
            'golden = ["golden/0.npz", "golden/1.npz"]',
        ]
        with open(os.path.join(pkg, "tern-model.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"  {name}: onnxruntime mAP@0.5 {acc:.4f} on {len(test_img)} held-out canvases",
              file=sys.stderr)
    with open(os.path.join(HERE, "testsets", "digits-det-boxes.json"), "w") as f:
        json.dump(reference, f)
        f.write("\n")


def build_dtypes(accuracy, tmp):
    """dtypes-demo (format 2), by construction: inputs of every dtype tern feeds but f32 —
    f16 values, an i64 gain, an i32 offset, a u8 mask, a bool switch — and outputs of some,
    so the engine's conversions are checked against onnxruntime. No training, no data:
    y = where(on, (x as f32) * gain + offset, 0) * mask, and the same y as f16."""
    del accuracy, tmp
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["gain"], ["gain32"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["offset"], ["offset32"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x32", "gain32"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset32"], ["shifted"]),
            helper.make_node("Where", ["on", "shifted", "zero"], ["gated"]),
            helper.make_node("Mul", ["gated", "mask32"], ["y"]),
            helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),
        ],
        "dtypes-demo",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4]),
            helper.make_tensor_value_info("gain", TensorProto.INT64, []),
            helper.make_tensor_value_info("offset", TensorProto.INT32, [1, 4]),
            helper.make_tensor_value_info("mask", TensorProto.UINT8, [1, 4]),
            helper.make_tensor_value_info("on", TensorProto.BOOL, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [1, 4]),
        ],
        [numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")],
    )
    pkg, sess = constructed_package("dtypes-demo", finish(graph))
    rng = np.random.default_rng(SEED + 3)
    for i in range(2):
        feed = {
            "x": rng.normal(0, 2, (1, 4)).astype(np.float16),
            "gain": np.array(3, np.int64),
            "offset": rng.integers(-5, 5, (1, 4)).astype(np.int32),
            "mask": rng.integers(0, 3, (1, 4)).astype(np.uint8),
            "on": rng.random((1, 4)) > 0.3,
        }
        y, y16 = sess.run(["y", "y16"], feed)
        arrays = {f"in/{k}": v for k, v in feed.items() if k != "gain"}
        arrays["out/y"] = y
        arrays["out/y16"] = y16
        write_npz(os.path.join(pkg, "golden", f"{i}.npz"), arrays)
    write_constructed_manifest(
        pkg, "dtypes-demo",
        "every input dtype tern feeds, by construction: y = where(on, x * gain + offset, 0) * mask",
        "0.01", [
        '[[inputs]]\nname = "x"\ndtype = "f16"\nshape = [1, 4]',
        '[[inputs]]\nname = "gain"\ndtype = "i64"\nshape = []\nvalue = 3',
        '[[inputs]]\nname = "offset"\ndtype = "i32"\nshape = [1, 4]',
        '[[inputs]]\nname = "mask"\ndtype = "u8"\nshape = [1, 4]',
        '[[inputs]]\nname = "on"\ndtype = "bool"\nshape = [1, 4]',
        "",
        '[[outputs]]\nname = "y"\n[outputs.postprocess]\nkind = "raw"',
        '[[outputs]]\nname = "y16"\n[outputs.postprocess]\nkind = "raw"',
    ])


def build_running_total():
    """running-total (format 2), by construction: a model with state for readings streams.
    Each reading (one field, `level`) is added to the state, and the sum so far is the output:
    a result shows exactly which readings of its source's stream went into it, so a test can
    see that two sources never share a stream and that a restarted stream starts from 0."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["total_in", "level"], ["total_next"]),
            helper.make_node("Identity", ["total_next"], ["total"]),
        ],
        "running-total",
        [
            helper.make_tensor_value_info("level", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("total_in", TensorProto.FLOAT, [1, 1]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("total_next", TensorProto.FLOAT, [1, 1]),
        ],
    )
    pkg, sess = constructed_package("running-total", finish(graph))
    for i, (level, before) in enumerate([(1.5, 0.0), (-2.0, 10.0)]):
        feed = {"level": np.array([[level]], np.float32),
                "total_in": np.array([[before]], np.float32)}
        total, nxt = sess.run(["total", "total_next"], feed)
        write_npz(os.path.join(pkg, "golden", f"{i}.npz"), {
            "in/level": feed["level"], "in/total_in": feed["total_in"],
            "out/total": total, "out/total_next": nxt})
    write_constructed_manifest(
        pkg, "running-total",
        "the sum of a stream's readings so far, by construction: a model with state",
        "0.0001", [
        '[[inputs]]\nname = "level"\ndtype = "f32"\nshape = [1, 1]',
        '[[inputs]]\nname = "total_in"\ndtype = "f32"\nshape = [1, 1]',
        "",
        '[[state]]\ninput = "total_in"\noutput = "total_next"',
        "",
        '[[outputs]]\nname = "total"\n[outputs.postprocess]\nkind = "raw"',
    ])


def constructed_package(name, model):
    """A fresh package directory for a model made by construction, with its model.onnx saved;
    the directory and an onnxruntime session on the model, to compute its golden vectors."""
    pkg = os.path.join(HERE, name)
    if os.path.exists(pkg):
        shutil.rmtree(pkg)
    os.makedirs(os.path.join(pkg, "golden"))
    onnx.save(model, os.path.join(pkg, "model.onnx"))
    sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), providers=["CPUExecutionProvider"])
    return pkg, sess


def write_constructed_manifest(pkg, name, description, tolerance, body):
    """tern-model.toml (format 2, f32, version 1.0.0) of a package made by construction:
    `body` is its inputs, state and outputs tables; two golden vectors, 0.npz and 1.npz."""
    lines = [
        "# Generated by firmware-updates/models/make_models.py; edit the script, not this file.",
        "format = 2",
        'name = "%s"' % name,
        'version = "1.0.0"',
        "description = %s" % json.dumps(description),
        'form = "f32"',
        "",
    ] + body + [
        "",
        "[selftest]",
        "tolerance = %s" % tolerance,
        'golden = ["golden/0.npz", "golden/1.npz"]',
    ]
    with open(os.path.join(pkg, "tern-model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("  %s: written" % name, file=sys.stderr)


def write_npz(path, arrays):
    """An uncompressed .npz with fixed timestamps, so reruns write the same bytes."""
    import io
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, buf.getvalue())


# ---------------------------------------------------------------- packages

def toml_list(xs):
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def write_package(name, form, onnx_path, spec, golden_x, test_x, test_y, accuracy):
    pkg = os.path.join(HERE, f"{name}-{form}")
    if os.path.exists(pkg):
        shutil.rmtree(pkg)
    os.makedirs(os.path.join(pkg, "golden"))
    shutil.copy(onnx_path, os.path.join(pkg, "model.onnx"))
    sess = ort.InferenceSession(os.path.join(pkg, "model.onnx"), providers=["CPUExecutionProvider"])
    golden = []
    for i, x in enumerate(golden_x):
        x = x[None].astype(np.float32)
        y = sess.run(["probs"], {"input": x})[0]
        np.save(os.path.join(pkg, "golden", f"{i}-input.npy"), x)
        np.save(os.path.join(pkg, "golden", f"{i}-output.npy"), y.astype(np.float32))
        golden.append(i)
    pred = sess.run(["probs"], {"input": test_x.astype(np.float32)})[0].argmax(1)
    acc = float((pred == test_y).mean())
    accuracy[f"{name}-{form}"] = acc
    shape = ", ".join(['"N"'] + [str(d) for d in spec["shape"]])
    lines = [
        "# Generated by firmware-updates/models/make_models.py; edit the script, not this file.",
        f'name = "{name}-{form}"',
        'version = "1.0.0"',
        f'description = "{spec["description"]} ({form})"',
        f'form = "{form}"',
        "",
        "[input]",
        'name = "input"',
        'dtype = "f32"',
        f"shape = [{shape}]",
        f'layout = "{spec["layout"]}"',
        "",
    ]
    if "preprocess" in spec:
        pre = spec["preprocess"]
        lines += ["[preprocess]", f'color = "{pre["color"]}"',
                  f'resize = [{pre["resize"][0]}, {pre["resize"][1]}]',
                  f'filter = "{pre["filter"]}"', f"scale = {1.0 / 255.0!r}", ""]
    lines += [
        "[output]",
        'name = "probs"',
        "",
        "[postprocess]",
        "softmax = false",
        f"top_k = {spec['top_k']}",
        f"labels = {toml_list(spec['labels'])}",
        "",
        "[selftest]",
        f"tolerance = {spec['tolerance'][form]}",
    ]
    for i in golden:
        lines += ["", "[[selftest.golden]]", f'input = "golden/{i}-input.npy"',
                  f'output = "golden/{i}-output.npy"']
    with open(os.path.join(pkg, "tern-model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"  {name}-{form}: onnxruntime accuracy {acc:.4f}", file=sys.stderr)


def build(name, fp32_model, spec, train_x, test_x, test_y, accuracy, tmp):
    fp32_path = os.path.join(tmp, f"{name}.onnx")
    onnx.save(fp32_model, fp32_path)
    golden_x = test_x[:GOLDEN_COUNT]
    calib = train_x[:200].astype(np.float32)
    write_package(name, "f32", fp32_path, spec, golden_x, test_x, test_y, accuracy)
    for form, broken in (("int8", False), ("int8-broken", True)):
        q_path = os.path.join(tmp, f"{name}-{form}.onnx")
        quantize(fp32_path, q_path, calib, broken)
        write_package(name, form, q_path, spec, golden_x, test_x, test_y, accuracy)


def digits_mlp_spec():
    return {
        "description": "8x8 grayscale handwritten digit classifier, MLP 64-64-10",
        "shape": [64], "layout": "nc", "top_k": 3, "labels": [str(i) for i in range(10)],
        "preprocess": {"color": "gray", "resize": [8, 8], "filter": "triangle"},
        "tolerance": {"f32": 1e-4, "int8": 1e-2, "int8-broken": 1e-2},
    }


def build_shuffled(spec, pix_tr, pix_te, y_tr, y_te, accuracy, tmp):
    """digits-mlp's network trained on the training labels shuffled among the images: the same
    inputs, outputs and size as digits-mlp-int8, answers that agree with it about as often as
    chance. A fixture for shadow evaluation, which must refuse it as an update of digits-mlp."""
    from sklearn.neural_network import MLPClassifier
    print("digits-mlp-shuffled", file=sys.stderr)
    shuffled = np.random.default_rng(SEED).permutation(y_tr)
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=SEED)
    mlp.fit(mlp_input(pix_tr), shuffled)
    layers = list(zip(mlp.coefs_, mlp.intercepts_))
    name = "digits-mlp-shuffled"
    fp32_path = os.path.join(tmp, f"{name}.onnx")
    onnx.save(dense_graph(name, layers, 64, 10), fp32_path)
    q_path = os.path.join(tmp, f"{name}-int8.onnx")
    quantize(fp32_path, q_path, mlp_input(pix_tr)[:200], False)
    spec = dict(spec, description="digits-mlp trained on shuffled labels, MLP 64-64-10")
    test_x = mlp_input(pix_te)
    write_package(name, "int8", q_path, spec, test_x[:GOLDEN_COUNT], test_x, y_te, accuracy)


def main():
    tmp = os.path.join(HERE, ".build")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(os.path.join(HERE, "testsets"), exist_ok=True)
    if sys.argv[1:] == ["--only", "dtypes-demo"]:
        build_dtypes(None, tmp)
        shutil.rmtree(tmp)
        return
    if sys.argv[1:] == ["--only", "digits-det"]:
        # Rebuild the detector alone; the other packages keep their bytes.
        with open(os.path.join(HERE, "accuracy.json")) as f:
            accuracy = json.load(f)
        print("digits-det", file=sys.stderr)
        build_detector(accuracy, tmp)
        with open(os.path.join(HERE, "accuracy.json"), "w") as f:
            json.dump(accuracy, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.rmtree(tmp)
        return
    if sys.argv[1:] == ["--only", "digits-mlp-shuffled"]:
        with open(os.path.join(HERE, "accuracy.json")) as f:
            accuracy = json.load(f)
        pix_tr, pix_te, y_tr, y_te = digits_pixels()
        build_shuffled(digits_mlp_spec(), pix_tr, pix_te, y_tr, y_te, accuracy, tmp)
        with open(os.path.join(HERE, "accuracy.json"), "w") as f:
            json.dump(accuracy, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.rmtree(tmp)
        return
    if sys.argv[1:] == ["--only", "running-total"]:
        build_running_total()
        shutil.rmtree(tmp)
        return
    # The trained models need scikit-learn (its bundled datasets); the others do not.
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    accuracy = {}
    tolerance = {"f32": 1e-4, "int8": 1e-2, "int8-broken": 1e-2}

    # -- digits
    pix_tr, pix_te, y_tr, y_te = digits_pixels()
    np.save(os.path.join(HERE, "testsets", "digits-test-pixels.npy"), pix_te)
    np.save(os.path.join(HERE, "testsets", "digits-test-labels.npy"), y_te.astype(np.int64))
    digit_labels = [str(i) for i in range(10)]

    print("digits-mlp", file=sys.stderr)
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=SEED)
    mlp.fit(mlp_input(pix_tr), y_tr)
    layers = list(zip(mlp.coefs_, mlp.intercepts_))
    build("digits-mlp", dense_graph("digits-mlp", layers, 64, 10), digits_mlp_spec(),
          mlp_input(pix_tr), mlp_input(pix_te), y_te, accuracy, tmp)
    build_shuffled(digits_mlp_spec(), pix_tr, pix_te, y_tr, y_te, accuracy, tmp)

    print("digits-cnn", file=sys.stderr)
    params = train_cnn(cnn_input(pix_tr), y_tr)
    build("digits-cnn", cnn_graph(params), {
        "description": "handwritten digit classifier, Conv32-Dense64-Dense10 on 3x32x32",
        "shape": [3, 32, 32], "layout": "nchw", "top_k": 3, "labels": digit_labels,
        "preprocess": {"color": "rgb", "resize": [32, 32], "filter": "nearest"},
        "tolerance": tolerance,
    }, cnn_input(pix_tr), cnn_input(pix_te), y_te, accuracy, tmp)

    # -- iris: standardisation folded into the first layer so the model takes raw centimetres,
    # the way a serial sensor reports them.
    print("iris-mlp", file=sys.stderr)
    iris = load_iris()
    x_tr, x_te, i_tr, i_te = train_test_split(iris.data.astype(np.float32), iris.target,
                                              test_size=0.3, random_state=0, stratify=iris.target)
    mean, std = x_tr.mean(0), x_tr.std(0)
    imlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=SEED)
    imlp.fit((x_tr - mean) / std, i_tr)
    w0 = imlp.coefs_[0] / std[:, None]
    b0 = imlp.intercepts_[0] - (mean / std) @ imlp.coefs_[0]
    layers = [(w0, b0), (imlp.coefs_[1], imlp.intercepts_[1])]
    np.save(os.path.join(HERE, "testsets", "iris-test-features.npy"), x_te)
    np.save(os.path.join(HERE, "testsets", "iris-test-labels.npy"), i_te.astype(np.int64))
    build("iris-mlp", dense_graph("iris-mlp", layers, 4, 3), {
        "description": "iris species from 4 measurements in cm, MLP 4-16-3",
        "shape": [4], "layout": "nc", "top_k": 2, "labels": list(iris.target_names),
        "tolerance": tolerance,
    }, x_tr, x_te, i_te, accuracy, tmp)

    print("digits-det", file=sys.stderr)
    build_detector(accuracy, tmp)
    build_dtypes(accuracy, tmp)
    build_running_total()

    with open(os.path.join(HERE, "accuracy.json"), "w") as f:
        json.dump(accuracy, f, indent=2, sort_keys=True)
        f.write("\n")

    # -- demo inbox: ten held-out digits, one per class, as 32x32 PNGs plus two JPEGs.
    inbox = os.path.join(REPO, "configs", "demo", "inbox")
    if os.path.exists(inbox):
        shutil.rmtree(inbox)
    os.makedirs(inbox)
    for digit in range(10):
        i = int(np.flatnonzero(y_te == digit)[0])
        img = Image.fromarray(pix_te[i]).resize((32, 32), Image.NEAREST).convert("RGB")
        img.save(os.path.join(inbox, f"digit-{digit}.png"))
    for digit in (3, 8):
        i = int(np.flatnonzero(y_te == digit)[1])
        img = Image.fromarray(pix_te[i]).resize((32, 32), Image.NEAREST).convert("RGB")
        img.save(os.path.join(inbox, f"digit-{digit}-b.jpg"), quality=95)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
