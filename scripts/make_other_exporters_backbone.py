#!/usr/bin/env python3
"""Writes fixtures/tiny/tiny_digits_exporters.onnx: a small backbone for 8x8 digits built
from the ops that backbones from other exporters bring, each as its exporter writes it:

- Caffe / Caffe2 (AlexNet, GoogLeNet, ResNet, ShuffleNet in the ONNX model zoo): opset 9,
  the input's batch fixed at 1 and written into the Reshape before the classifier
  ([1, -1]), LRN after the first convolution, a residual block whose branches are joined by
  a variadic Sum, the classifier a Gemm with transB followed by Softmax;
- converted face and detection models: PRelu with a [C, 1, 1] slope, Elu;
- PyTorch's GroupNorm before opset 18: Reshape to [N, groups, -1], InstanceNormalization
  with a ones/zeros scale and bias, Reshape back, then the per-channel Mul and Add.

Input `input` [1, 1, 8, 8] (pixel / 16), output `prob` [1, 10]. Seeded
random weights (numpy RandomState(11)): a fixture for the engine, the methods and the
artifact, not a trained model. Deterministic: rerunning gives the same bytes.

    python3 scripts/make_other_exporters_backbone.py fixtures/tiny/tiny_digits_exporters.onnx

Needs onnx==1.23.2 and numpy (`scripts/fetch.sh models` creates .cache/venv with both).
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main(dst):
    rng = np.random.RandomState(11)
    inits = []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name, *shape):
        fan_in = int(np.prod(shape[1:]))
        return init(name, (rng.randn(*shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def small(name, *shape, scale=0.1):
        return init(name, (rng.randn(*shape) * scale).astype(np.float32))

    conv = lambda name, x, w, b, pad=1, stride=1: helper.make_node(  # noqa: E731
        "Conv", [x, w, b], [name], name=name, kernel_shape=[3, 3], pads=[pad] * 4, strides=[stride] * 2
    )
    nodes = [
        # Caffe's first block: convolution, LRN, then PRelu with one slope per channel.
        conv("conv1", "input", weight("conv1_w", 8, 1, 3, 3), small("conv1_b", 8)),
        helper.make_node("LRN", ["conv1"], ["norm1"], name="norm1", size=5, alpha=1e-2, beta=0.75, bias=1.0),
        helper.make_node(
            "PRelu", ["norm1", init("prelu1_slope", np.full((8, 1, 1), 0.25, np.float32))], ["act1"], name="prelu1"
        ),
        # Caffe2's residual block: conv + BN, conv + BN, Sum with the shortcut, Relu.
        conv("conv2a", "act1", weight("conv2a_w", 8, 8, 3, 3), small("conv2a_b", 8)),
        helper.make_node(
            "BatchNormalization",
            [
                "conv2a",
                init("bn2a_s", (1 + rng.randn(8) * 0.1).astype(np.float32)),
                small("bn2a_b", 8),
                small("bn2a_m", 8),
                init("bn2a_v", (1 + np.abs(rng.randn(8)) * 0.1).astype(np.float32)),
            ],
            ["bn2a"],
            name="bn2a",
        ),
        helper.make_node("Relu", ["bn2a"], ["relu2a"], name="relu2a"),
        conv("conv2b", "relu2a", weight("conv2b_w", 8, 8, 3, 3), small("conv2b_b", 8)),
        helper.make_node("Sum", ["conv2b", "act1"], ["sum2"], name="sum2"),
        helper.make_node("Elu", ["sum2"], ["act2"], name="elu2", alpha=1.0),
        # Downsampling convolution, then PyTorch's GroupNorm(4 groups, 16 channels) at opset 13.
        conv("conv3", "act2", weight("conv3_w", 16, 8, 3, 3), small("conv3_b", 16), stride=2),
        helper.make_node(
            "Reshape", ["conv3", init("gn3_grouped", np.array([0, 4, -1], np.int64))], ["gn3_in"], name="gn3_reshape"
        ),
        helper.make_node(
            "InstanceNormalization",
            ["gn3_in", init("gn3_ones", np.ones(4, np.float32)), init("gn3_zeros", np.zeros(4, np.float32))],
            ["gn3_norm"],
            name="gn3_instance_norm",
            epsilon=1e-5,
        ),
        helper.make_node("Shape", ["conv3"], ["conv3_shape"], name="gn3_shape"),
        helper.make_node("Reshape", ["gn3_norm", "conv3_shape"], ["gn3_back"], name="gn3_reshape_back"),
        helper.make_node(
            "Mul", ["gn3_back", init("gn3_weight", (1 + rng.randn(16, 1, 1) * 0.1).astype(np.float32))], ["gn3_mul"]
        ),
        helper.make_node("Add", ["gn3_mul", small("gn3_bias", 16, 1, 1)], ["gn3"], name="gn3_add"),
        helper.make_node("Relu", ["gn3"], ["act3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["act3"], ["pool"], name="pool"),
        helper.make_node("Reshape", ["pool", init("flat_shape", np.array([1, -1], np.int64))], ["features"], name="flatten"),
        helper.make_node(
            "Gemm",
            ["features", weight("fc_w", 10, 16), small("fc_b", 10)],
            ["logits"],
            name="fc",
            transB=1,
        ),
        helper.make_node("Softmax", ["logits"], ["prob"], name="prob", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_digits_exporters",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="mtpack-fixtures")
    m.ir_version = 4
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, dst)
    print(f"wrote {dst}: {len(nodes)} nodes, {sum(t.ByteSize() for t in inits)} bytes of weights", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
