"""Tiny ADM networks that more than one test module builds (test_compile.py, test_gpu.py,
test_classifier_pass.py), each factory under its own name, with its own seed and initialisation."""

from __future__ import annotations

import torch

from fastguide.adm import EncoderUNetModel, UNetModel

K = 4  # classes of tiny_nets' networks


def tiny_nets(learn_sigma=True, class_cond=True):
    torch.manual_seed(0)
    unet = UNetModel(8, 3, 32, 6 if learn_sigma else 3, 1, (2,), channel_mult=(1, 2), num_head_channels=16,
                     num_classes=K if class_cond else None)  # fmt: skip
    clf = EncoderUNetModel(8, 3, 32, K, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
    with torch.no_grad():
        for p in [*unet.parameters(), *clf.parameters()]:
            p.normal_(0, 0.05)
    return unet.eval(), clf.eval()
