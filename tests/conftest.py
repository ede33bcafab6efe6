"""Suite-wide setup. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before triton is first imported, so it is set here, at collection time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
