#!/usr/bin/env python3
"""PyTorch baseline for the ViT rows of benches/train_throughput.rs: the ViT-S/14 encoder of
.cache/models/vit_s14_focus.onnx rebuilt as the Hugging Face Dinov2Model it was exported from
(hidden 384, 12 layers, 6 heads, patch 14, layer scale, position embeddings for 518x518
interpolated bicubically to the input), with the ONNX file's weights copied in (MatMul weights
found by their nodes' module paths, transposed), the class token after the final LayerNorm,
and a 10-class Linear head. Input 3x224x224, batch 8, SGD lr 0.01 momentum 0.9, train()
(dropout is 0 in this configuration); inference in eval().

Before timing it checks that its encoder output equals ONNX Runtime's on the same input when
onnxruntime is installed (printed as "max_abs_diff_vs_onnx"), so the two sides run the same
network.

Prints one JSON line: {"train_images_per_second", "inference_images_per_second", "threads",
"torch", "max_abs_diff_vs_onnx"}. Needs torch, transformers 4.x (5.0 renamed the Dinov2 attention
weights), onnx (and optionally onnxruntime).
With a fourth argument `bf16` the step and inference run under torch.autocast("cpu",
dtype=torch.bfloat16) (PyTorch's mixed precision: linear layers and matmuls in bf16 through
oneDNN, on AMX where the CPU has it; weights and optimizer in f32), the counterpart of
`mtpack adapt --precision bf16`.
Usage: pytorch_vit_baseline.py ONNX STEPS THREADS [bf16]
"""
import json
import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import rate  # noqa: E402  the same timing as the MobileNetV2 baseline

BATCH = 8


def load(path):
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=14, image_size=518, layerscale_value=1.0, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    net = Dinov2Model(cfg)
    state = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = torch.from_numpy(value.copy())
    # The export split the position embeddings: the class token's (onnx::Concat_1957) and the
    # 37x37 grid's (onnx::Reshape_1962).
    pos = np.concatenate([inits["onnx::Concat_1957"], inits["onnx::Reshape_1962"]], axis=1)
    state["embeddings.position_embeddings"] = torch.from_numpy(pos)
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.name.startswith("/backbone/encoder/") and n.input[1] in inits:
            module = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[module + ".weight"] = torch.from_numpy(inits[n.input[1]].T.copy())
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("mask_token")]
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net


class Classifier(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(384, 10)

    def forward(self, x):
        return self.head(self.encoder(pixel_values=x).last_hidden_state[:, 0])


def parity(net, path):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    m = onnx.load(path)
    feature = "/backbone/layernorm/Add_1_output_0"
    m.graph.output.insert(0, onnx.helper.make_empty_tensor_value_info(feature))
    sess = ort.InferenceSession(m.SerializeToString())
    x = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
    want = sess.run([feature], {"input_image": x})[0]
    with torch.no_grad():
        got = net(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(want - got).max())


def main():
    path, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bf16 = len(sys.argv) > 4 and sys.argv[4] == "bf16"
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = load(path)
    encoder.eval()
    diff = parity(encoder, path)
    model = Classifier(encoder)
    x = torch.randn(BATCH, 3, 224, 224)
    y = torch.randint(0, 10, (BATCH,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        opt.zero_grad()
        with cast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def infer_step():
        with cast:
            model(x)

    model.train()
    train = rate(train_step, steps, BATCH)
    model.eval()
    with torch.no_grad():
        infer = rate(infer_step, steps, BATCH)
    print(json.dumps({"train_images_per_second": train, "inference_images_per_second": infer,
                      "threads": threads, "torch": torch.__version__, "max_abs_diff_vs_onnx": diff,
                      "precision": "bf16" if bf16 else "f32"}))


if __name__ == "__main__":
    main()
