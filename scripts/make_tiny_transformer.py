#!/usr/bin/env python3
"""Writes fixtures/tiny/tiny_vit.onnx: a two-block vision transformer for 8x8 grey digits,
written node by node the way PyTorch 2.x exports a ViT at opset 14, so that unit and CLI
tests exercise every pattern real encoders bring, in seconds:

- patch embedding: Conv 2x2 stride 2 (16 patches of width 16), Reshape/Transpose to tokens;
- a class token expanded to the batch through Shape/ConstantOfShape/Mul/Equal/Where/Expand
  (PyTorch's `cls_token.expand(B, -1, -1)`);
- position embeddings stored for a 3x3 grid and resized bicubically (half-pixel) to the
  4x4 grid computed from the input's shape (Shape/Gather/Div/Cast/Concat);
- LayerNorm written out (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add);
- attention: one MatMul for q, k, v, Reshape by a shape computed at run time, Transpose,
  Split, MatMul, scale, Softmax(-1), MatMul, Transpose, Reshape, projection;
- GELU through Erf; residual Adds;
- weights made by nodes: block 1's fc2 weight is a Constant node, its bias a ConstantOfShape
  of a constant shape, and block 2's projection reads block 1's through an Identity (tied).

The graph output is the token sequence [batch, 17, 16] after the final LayerNorm: a
headless encoder. Weights are seeded random numbers (numpy RandomState(7)); the model is a
test fixture, not a trained network. Deterministic: rerunning gives the same bytes.

    python3 scripts/make_tiny_transformer.py fixtures/tiny/tiny_vit.onnx

Needs onnx==1.23.2 and numpy (`scripts/fetch.sh models` creates .cache/venv with both).
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, HEADS, GRID, STORED_GRID, PATCH, HIDDEN, BLOCKS = 16, 2, 4, 3, 2, 32, 2
rng = np.random.RandomState(7)
nodes, inits = [], []
counter = [0]


def fresh(prefix):
    counter[0] += 1
    return f"/{prefix}/out_{counter[0]}"


def init(name, arr):
    inits.append(numpy_helper.from_array(np.asarray(arr), name))
    return name


def const(prefix, arr):
    out = fresh(prefix)
    nodes.append(helper.make_node("Constant", [], [out], name=out + "_c", value=numpy_helper.from_array(np.asarray(arr))))
    return out


def op(kind, prefix, inputs, **attrs):
    out = fresh(prefix)
    nodes.append(helper.make_node(kind, inputs, [out], name=out + "_n", **attrs))
    return out


def weight(shape, scale):
    return (rng.randn(*shape) * scale).astype(np.float32)


def layer_norm(prefix, x, dim):
    mean = op("ReduceMean", prefix, [x], axes=[-1])
    centred = op("Sub", prefix, [x, mean])
    sq = op("Pow", prefix, [centred, const(prefix, np.array(2.0, np.float32))])
    var = op("ReduceMean", prefix, [sq], axes=[-1])
    std = op("Sqrt", prefix, [op("Add", prefix, [var, const(prefix, np.array(1e-6, np.float32))])])
    normed = op("Div", prefix, [centred, std])
    g = init(f"{prefix}.weight", (1 + 0.1 * rng.randn(dim)).astype(np.float32))
    b = init(f"{prefix}.bias", (0.1 * rng.randn(dim)).astype(np.float32))
    return op("Add", prefix, [op("Mul", prefix, [normed, g]), b])


def dim_of(prefix, x, axis):
    """Gather(Shape(x), axis) unsqueezed to [1], as PyTorch writes x.shape[axis] into a shape."""
    g = op("Gather", prefix, [op("Shape", prefix, [x]), const(prefix, np.array(axis, np.int64))], axis=0)
    return op("Unsqueeze", prefix, [g, const(prefix, np.array([0], np.int64))])


def linear(prefix, x, w_name, b_name):
    return op("Add", prefix, [b_name, op("MatMul", prefix, [x, w_name])])


def attention(prefix, x, proj_w):
    qkv = linear(prefix, x, init(f"{prefix}.qkv.weight", weight((D, 3 * D), 0.25)),
                 init(f"{prefix}.qkv.bias", weight((3 * D,), 0.05)))
    shape = op("Concat", prefix, [dim_of(prefix, x, 0), dim_of(prefix, x, 1),
                                  const(prefix, np.array([3, HEADS, D // HEADS], np.int64))], axis=0)
    heads = op("Transpose", prefix, [op("Reshape", prefix, [qkv, shape])], perm=[2, 0, 3, 1, 4])
    outs = [fresh(prefix) for _ in range(3)]
    nodes.append(helper.make_node("Split", [heads, init(f"{prefix}.split", np.array([1, 1, 1], np.int64))], outs,
                                  name=outs[0] + "_split", axis=0))
    q, k, v = (op("Squeeze", prefix, [o, const(prefix, np.array([0], np.int64))]) for o in outs)
    scores = op("MatMul", prefix, [q, op("Transpose", prefix, [k], perm=[0, 1, 3, 2])])
    scores = op("Mul", prefix, [scores, const(prefix, np.array((D // HEADS) ** -0.5, np.float32))])
    ctx = op("MatMul", prefix, [op("Softmax", prefix, [scores], axis=-1), v])
    ctx = op("Transpose", prefix, [ctx], perm=[0, 2, 1, 3])
    merged = op("Reshape", prefix, [ctx, op("Concat", prefix, [dim_of(prefix, x, 0), dim_of(prefix, x, 1),
                                                               const(prefix, np.array([D], np.int64))], axis=0)])
    return linear(prefix, merged, proj_w, init(f"{prefix}.proj.bias", weight((D,), 0.05)))


def gelu(prefix, x):
    e = op("Erf", prefix, [op("Div", prefix, [x, const(prefix, np.array(1.4142135, np.float32))])])
    y = op("Mul", prefix, [x, op("Add", prefix, [e, const(prefix, np.array(1.0, np.float32))])])
    return op("Mul", prefix, [y, const(prefix, np.array(0.5, np.float32))])


def mlp(prefix, x, from_nodes):
    h = gelu(prefix, linear(prefix, x, init(f"{prefix}.fc1.weight", weight((D, HIDDEN), 0.25)),
                            init(f"{prefix}.fc1.bias", weight((HIDDEN,), 0.05))))
    if from_nodes:
        w = const(prefix + "/fc2_weight", weight((HIDDEN, D), 0.18))
        b = op("ConstantOfShape", prefix, [init(f"{prefix}.fc2.bias_shape", np.array([D], np.int64))],
               value=numpy_helper.from_array(np.array([0.0], np.float32)))
    else:
        w = init(f"{prefix}.fc2.weight", weight((HIDDEN, D), 0.18))
        b = init(f"{prefix}.fc2.bias", weight((D,), 0.05))
    return linear(prefix, h, w, b)


def embeddings(x):
    p = "embeddings"
    conv = op("Conv", p, [x, init("patch.weight", weight((D, 1, PATCH, PATCH), 0.5)), init("patch.bias", weight((D,), 0.1))],
              kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    flat = op("Reshape", p, [conv, op("Concat", p, [dim_of(p, conv, 0), dim_of(p, conv, 1),
                                                     const(p, np.array([-1], np.int64))], axis=0)])
    tokens = op("Transpose", p, [flat], perm=[0, 2, 1])
    # cls_token.expand(B, -1, -1)
    target = op("Concat", p, [dim_of(p, x, 0), const(p, np.array([-1, -1], np.int64))], axis=0)
    ones = op("ConstantOfShape", p, [op("Shape", p, [target])], value=numpy_helper.from_array(np.array([1], np.int64)))
    minus = op("Mul", p, [ones, const(p, np.array(-1, np.int64))])
    fixed = op("Where", p, [op("Equal", p, [target, minus]), ones, target])
    cls = op("Expand", p, [init("cls_token", weight((1, 1, D), 0.5)), fixed])
    seq = op("Concat", p, [cls, tokens], axis=1)
    # Position embeddings stored for a 3x3 grid, resized to the input's grid.
    pos = init("pos_embed", weight((1, 1 + STORED_GRID * STORED_GRID, D), 0.3))
    cls_pos = op("Slice", p, [pos, const(p, np.array([0], np.int64)), const(p, np.array([1], np.int64)),
                              const(p, np.array([1], np.int64))])
    grid_pos = op("Slice", p, [pos, const(p, np.array([1], np.int64)), const(p, np.array([1 << 30], np.int64)),
                               const(p, np.array([1], np.int64))])
    grid_pos = op("Reshape", p, [grid_pos, const(p, np.array([1, STORED_GRID, STORED_GRID, D], np.int64))])
    grid_pos = op("Transpose", p, [grid_pos], perm=[0, 3, 1, 2])
    side = [op("Cast", p, [op("Div", p, [op("Gather", p, [op("Shape", p, [x]), const(p, np.array(a, np.int64))], axis=0),
                                         const(p, np.array(PATCH, np.int64))])], to=TensorProto.INT64) for a in (2, 3)]
    sizes = op("Concat", p, [const(p, np.array([1, D], np.int64))] +
               [op("Unsqueeze", p, [s, const(p, np.array([0], np.int64))]) for s in side], axis=0)
    resized = op("Resize", p, [grid_pos, "", "", sizes], mode="cubic", coordinate_transformation_mode="half_pixel",
                 cubic_coeff_a=-0.75)
    grid_pos = op("Transpose", p, [op("Reshape", p, [resized, const(p, np.array([1, D, -1], np.int64))])], perm=[0, 2, 1])
    return op("Add", p, [seq, op("Concat", p, [cls_pos, grid_pos], axis=1)])


def main(out_path):
    x = "pixels"
    h = embeddings(x)
    proj_w = None
    for b in range(BLOCKS):
        p = f"block{b}"
        if proj_w is None:
            proj_w = init(f"{p}.attn.proj.weight", weight((D, D), 0.25))
        else:
            # Block 2 shares block 1's projection, through an Identity (tied weights).
            tied = fresh(p)
            nodes.append(helper.make_node("Identity", [proj_w], [tied], name=tied + "_tie"))
            proj_w = tied
        h = op("Add", p, [h, attention(p + "/attn", layer_norm(p + "/norm1", h, D), proj_w)])
        h = op("Add", p, [h, mlp(p + "/mlp", layer_norm(p + "/norm2", h, D), from_nodes=(b == 0))])
    out = layer_norm("norm", h, D)
    nodes.append(helper.make_node("Identity", [out], ["tokens"], name="tokens"))
    graph = helper.make_graph(
        nodes, "tiny_vit",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 1 + GRID * GRID, D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="mtpack fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, out_path)
    print(f"wrote {out_path}: {len(nodes)} nodes, {sum(t.size for t in map(numpy_helper.to_array, inits))} "
          f"parameters in initializers", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
