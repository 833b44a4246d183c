"""Train the evaluation network (fastguide.evalnet.ResNetJudge) on the MNIST 5k train split, with augmentation,
and write it as an embedded model folder: model.safetensors, config.json (architecture, recipe, held-out
accuracy) and MODEL_CARD.md.

    OMP_NUM_THREADS=2 python scripts/train_eval_net.py --out fastguide/weights/eval_resnet

Deterministic for a seed on one machine (one generator for batches and augmentation). Minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastguide.evalnet import ResNetJudge, augment
from fastguide.files import atomic_write
from fastguide.train.data import mnist5k


def accuracy(net: ResNetJudge, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return (pred == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fastguide/weights/eval_resnet")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--label_smoothing", type=float, default=0.0,
                   help="0 keeps the softmax confident on real digits (Inception Score near 10)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    train, held = mnist5k("train"), mnist5k("heldout")
    x, y = train.pixels.float() / 127.5 - 1, train.labels
    xh, yh = held.pixels.float() / 127.5 - 1, held.labels
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = ResNetJudge(x.shape[1], x.shape[-1], 10, args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(net(augment(x[idx], gen)), y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, held-out accuracy "
              f"{accuracy(net, xh, yh):.4f}", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    clean = accuracy(net, xh, yh)
    views = augment(xh, torch.Generator().manual_seed(1))
    augmented = accuracy(net, views, yh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    config = {"architecture": "ResNetJudge", "data": "mnist5k", "model": net.config(), "recipe": vars(args), "steps": step,
              "train_seconds": round(seconds, 1), "heldout_accuracy": clean, "heldout_accuracy_augmented": augmented}  # fmt: skip
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1) + "\n"))
    print(json.dumps(config), flush=True)


if __name__ == "__main__":
    main()
