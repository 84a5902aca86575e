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
from sklearn.datasets import load_digits, load_iris
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SEED = 20261128
OPSET = 17
GOLDEN_COUNT = 4


# ---------------------------------------------------------------- data

def digits_pixels():
    """Digits as the 8-bit grayscale images a camera would deliver (0..255)."""
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


def main():
    tmp = os.path.join(HERE, ".build")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(os.path.join(HERE, "testsets"), exist_ok=True)
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
    build("digits-mlp", dense_graph("digits-mlp", layers, 64, 10), {
        "description": "8x8 grayscale handwritten digit classifier, MLP 64-64-10",
        "shape": [64], "layout": "nc", "top_k": 3, "labels": digit_labels,
        "preprocess": {"color": "gray", "resize": [8, 8], "filter": "triangle"},
        "tolerance": tolerance,
    }, mlp_input(pix_tr), mlp_input(pix_te), y_te, accuracy, tmp)

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
