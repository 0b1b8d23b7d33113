"""Session-wide test setup: run Triton kernels in its CPU interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported anywhere in the
process (deepspeed and others import it), hence here, before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
