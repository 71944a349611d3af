#!/usr/bin/env python3
"""Fine-tunes the ViT-S/14 of .cache/models/vit_s14_focus.onnx in PyTorch (the Dinov2Model of
scripts/pytorch_vit_baseline.py, the ONNX file's weights, class token, a new 10-class Linear
head) on an mtpack dataset (safetensors with x, y, x_test, y_test of 28x28 grey images), to
set mtpack's fine-tuning of the same network beside PyTorch's: the README's "Your own
backbone" section compares the two loss curves at SGD lr 1e-4, momentum 0.9, batch 8.

Images are resized to 224x224 bilinearly, repeated to three channels and normalised with
ImageNet's mean and std (mtpack resizes with its own resampler, so inputs agree closely, not
exactly). Batch order and head initialisation come from torch.manual_seed(0).

Prints the mean training loss of each epoch (and the first six steps' losses), then the
held-out accuracy. Needs torch, transformers 4.x, onnx, safetensors.
Usage: pytorch_vit_finetune.py ONNX DATASET LR [sgd|adamw] [EPOCHS]
"""
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

from pytorch_vit_baseline import Classifier, load

BATCH = 8


def prep(images):
    x = torch.from_numpy(images.astype(np.float32))
    if x.dim() == 3:
        x = x[:, None]
    x = torch.nn.functional.interpolate(x / 255.0, size=(224, 224), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3 // x.shape[1], 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (x - mean) / std


def main():
    path, data, lr = sys.argv[1], sys.argv[2], float(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) > 4 else "sgd"
    epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    torch.set_num_threads(2)
    torch.manual_seed(0)
    d = load_file(data)
    x, y = prep(d["x"]), torch.from_numpy(d["y"].astype(np.int64))
    xt, yt = prep(d["x_test"]), torch.from_numpy(d["y_test"].astype(np.int64))
    model = Classifier(load(path))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order, losses = torch.randperm(len(y)), []
        for i in range(0, len(y), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch}: mean loss {np.mean(losses):.4f}, first steps {[round(v, 2) for v in losses[:6]]}")
    model.eval()
    with torch.no_grad():
        right = sum((model(xt[i:i + 50]).argmax(1) == yt[i:i + 50]).sum().item() for i in range(0, len(yt), 50))
    print(f"held-out accuracy {right / len(yt):.3f}")


if __name__ == "__main__":
    main()
