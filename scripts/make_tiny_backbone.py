#!/usr/bin/env python3
"""Train the tiny backbone committed as fixtures/tiny/tiny_digits.onnx.

Data: the UCI optical digits (8x8, 1797 images) as bundled in the PyPI wheel
scikit-learn==1.9.1 (sklearn/datasets/data/digits.csv.gz, committed under fixtures/digits/,
sha256 in fixtures/digits/SOURCE). Split: a permutation with numpy seed 0; the first 1437
images train, the last 360 are held out (the same split `mtpack` uses for the bundled digits).

Model (input [N,1,8,8] = pixel/16):
  conv1 3x3 1->8 pad 1 -> BatchNormalization -> Relu
  conv2 3x3 8->16 stride 2 pad 1 (+bias) -> Relu          -> [N,16,4,4]
  Flatten -> fc1 Gemm 256->32 -> Relu                      -> "features" (the cut point)
  head Gemm 32->10                                         -> "logits"

Trained with plain numpy (im2col convolutions, manual backprop, Adam lr 3e-3, batch 64,
40 epochs, seed 0). BatchNormalization is trained as a per-channel affine a*x+b; afterwards
its running statistics are set to the real training-set mean/variance of conv1's output and
gamma/beta chosen so the node computes exactly the trained affine. Prints held-out accuracy.

It also writes the split it used as an mtpack task dataset (DATASET.safetensors: uint8 x/y for
training, x_test/y_test held out, label names, pixel_max 16), so that the built-in default of
`mtpack adapt` evaluates on images the tiny backbone never saw.

Usage: make_tiny_backbone.py DIGITS.csv.gz OUT.onnx DATASET.safetensors
"""
import json
import struct
import gzip
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5


def load_digits(path):
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    raw = rows[:, :64].reshape(-1, 1, 8, 8).astype(np.uint8)
    y = rows[:, 64].astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    return raw[perm[:1437]], y[perm[:1437]], raw[perm[1437:]], y[perm[1437:]]


def write_safetensors(path, tensors, metadata):
    """The safetensors layout: u64 header length, JSON header, then the raw buffers."""
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.int64): "I64"}
    for name, arr in tensors:
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def im2col(x, k, stride, pad):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k, k, oh, ow), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return cols.reshape(n, c * k * k, oh * ow), (oh, ow)


def col2im(cols, shape, k, stride, pad, ohw):
    n, c, h, w = shape
    oh, ow = ohw
    cols = cols.reshape(n, c, k, k, oh, ow)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), cols.dtype)
    for i in range(k):
        for j in range(k):
            xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += cols[:, :, i, j]
    return xp[:, :, pad:pad + h, pad:pad + w]


def conv_fwd(x, w, stride, pad):
    cols, ohw = im2col(x, w.shape[2], stride, pad)
    out = np.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols)
    return out.reshape(x.shape[0], w.shape[0], *ohw), (cols, ohw)


def conv_bwd(dout, x, w, stride, pad, cache):
    cols, ohw = cache
    d = dout.reshape(dout.shape[0], dout.shape[1], -1)
    dw = np.einsum("nop,nkp->ok", d, cols).reshape(w.shape)
    dcols = np.einsum("ok,nop->nkp", w.reshape(w.shape[0], -1), d)
    return col2im(dcols, x.shape, w.shape[2], stride, pad, ohw), dw


def init(rng):
    he = lambda fan, shape: (rng.randn(*shape) * np.sqrt(2.0 / fan)).astype(np.float32)
    return {
        "conv1.w": he(9, (8, 1, 3, 3)), "bn1.a": np.ones(8, np.float32), "bn1.b": np.zeros(8, np.float32),
        "conv2.w": he(72, (16, 8, 3, 3)), "conv2.b": np.zeros(16, np.float32),
        "fc1.w": he(256, (32, 256)), "fc1.b": np.zeros(32, np.float32),
        "head.w": he(32, (10, 32)) * 0.5, "head.b": np.zeros(10, np.float32),
    }


def forward(p, x):
    c1, k1 = conv_fwd(x, p["conv1.w"], 1, 1)
    a1 = c1 * p["bn1.a"][None, :, None, None] + p["bn1.b"][None, :, None, None]
    r1 = np.maximum(a1, 0)
    c2, k2 = conv_fwd(r1, p["conv2.w"], 2, 1)
    c2 = c2 + p["conv2.b"][None, :, None, None]
    r2 = np.maximum(c2, 0)
    f = r2.reshape(len(x), -1)
    h = f @ p["fc1.w"].T + p["fc1.b"]
    rh = np.maximum(h, 0)
    logits = rh @ p["head.w"].T + p["head.b"]
    return logits, (x, c1, k1, a1, r1, c2, k2, f, h, rh)


def backward(p, cache, dlogits):
    x, c1, k1, a1, r1, c2, k2, f, h, rh = cache
    g = {"head.w": dlogits.T @ rh, "head.b": dlogits.sum(0)}
    dh = (dlogits @ p["head.w"]) * (h > 0)
    g["fc1.w"], g["fc1.b"] = dh.T @ f, dh.sum(0)
    dc2 = (dh @ p["fc1.w"]).reshape(c2.shape) * (c2 > 0)
    g["conv2.b"] = dc2.sum((0, 2, 3))
    dr1, g["conv2.w"] = conv_bwd(dc2, r1, p["conv2.w"], 2, 1, k2)
    da1 = dr1 * (a1 > 0)
    g["bn1.a"], g["bn1.b"] = (da1 * c1).sum((0, 2, 3)), da1.sum((0, 2, 3))
    dc1 = da1 * p["bn1.a"][None, :, None, None]
    _, g["conv1.w"] = conv_bwd(dc1, x, p["conv1.w"], 1, 1, k1)
    return g


def train(xtr, ytr):
    rng = np.random.RandomState(0)
    p = init(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    step, lr, b1, b2 = 0, 3e-3, 0.9, 0.999
    for epoch in range(40):
        perm = rng.permutation(len(ytr))
        for s in range(0, len(perm), 64):
            idx = perm[s:s + 64]
            logits, cache = forward(p, xtr[idx])
            z = logits - logits.max(1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            prob[np.arange(len(idx)), ytr[idx]] -= 1
            grads = backward(p, cache, prob / len(idx))
            step += 1
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                mh, vh = m[k] / (1 - b1 ** step), v[k] / (1 - b2 ** step)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return p


def to_onnx(p, xtr):
    c1, _ = conv_fwd(xtr, p["conv1.w"], 1, 1)
    mean, var = c1.mean((0, 2, 3)).astype(np.float32), c1.var((0, 2, 3)).astype(np.float32)
    gamma = (p["bn1.a"] * np.sqrt(var + EPS)).astype(np.float32)
    beta = (p["bn1.b"] + p["bn1.a"] * mean).astype(np.float32)
    t = lambda a, n: numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), n)
    inits = [t(p["conv1.w"], "conv1.weight"), t(gamma, "bn1.scale"), t(beta, "bn1.bias"),
             t(mean, "bn1.mean"), t(var, "bn1.var"), t(p["conv2.w"], "conv2.weight"),
             t(p["conv2.b"], "conv2.bias"), t(p["fc1.w"], "fc1.weight"), t(p["fc1.b"], "fc1.bias"),
             t(p["head.w"], "head.weight"), t(p["head.b"], "head.bias")]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["conv1.out"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv1.out", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["bn1.out"], name="bn1", epsilon=EPS),
        helper.make_node("Relu", ["bn1.out"], ["relu1.out"], name="relu1"),
        helper.make_node("Conv", ["relu1.out", "conv2.weight", "conv2.bias"], ["conv2.out"], name="conv2", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2.out"], ["relu2.out"], name="relu2"),
        helper.make_node("Flatten", ["relu2.out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1.out"], ["features"], name="relu3"),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mtpack-make_tiny_backbone")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    rtr, ytr, rte, yte = load_digits(sys.argv[1])
    write_safetensors(sys.argv[3], [("x", rtr), ("y", ytr), ("x_test", rte), ("y_test", yte)], {
        "mtpack.format": "mtpack.dataset/1",
        "mtpack.labels": json.dumps([str(i) for i in range(10)]),
        "mtpack.source": "UCI optical digits from scikit-learn==1.9.1 digits.csv.gz, numpy seed 0 split 1437/360",
        "mtpack.pixel_max": "16",
    })
    xtr, xte = rtr.astype(np.float32) / 16.0, rte.astype(np.float32) / 16.0
    p = train(xtr, ytr)
    acc = (forward(p, xte)[0].argmax(1) == yte).mean()
    onnx.save(to_onnx(p, xtr), sys.argv[2])
    print(f"held-out accuracy on {len(yte)} digits: {acc:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
