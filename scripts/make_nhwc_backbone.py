#!/usr/bin/env python3
"""Writes fixtures/tiny/tiny_digits_nhwc.onnx: the tiny digit backbone as a TensorFlow
export presents it (tf2onnx style): the image input is NHWC [batch, 8, 8, 1] and a Transpose
(perm 0,3,1,2) turns it into the NCHW tensor the convolutions read. Same weights, same
outputs as fixtures/tiny/tiny_digits.onnx for the same images. Deterministic.

    python3 scripts/make_nhwc_backbone.py fixtures/tiny/tiny_digits.onnx fixtures/tiny/tiny_digits_nhwc.onnx

Needs onnx==1.23.2 (`scripts/fetch.sh models` creates .cache/venv with it).
"""
import sys

import onnx
from onnx import TensorProto, helper


def main(src, dst):
    m = onnx.load(src)
    g = m.graph
    (inp,) = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    old = inp.name
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    n, c, h, w = dims
    nhwc = "image_nhwc"
    g.node.insert(0, helper.make_node("Transpose", [nhwc], [old], name="nhwc_to_nchw", perm=[0, 3, 1, 2]))
    g.input.remove(inp)
    g.input.insert(0, helper.make_tensor_value_info(nhwc, TensorProto.FLOAT, [n, h, w, c]))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, dst)
    print(f"wrote {dst}: input {nhwc} {[n, h, w, c]}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
