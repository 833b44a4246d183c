"""Test-wide setup: without CUDA, Triton kernels run in Triton's CPU interpreter.

The interpreter is read when Triton is first imported, so this is set before any test module loads.
Automatic dispatch never picks the interpreter; tests that want it force FASTGUIDE_BACKEND=triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
