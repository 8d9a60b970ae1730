"""Where an actor runs its model: CUDA when the actor was given a GPU, else CPU."""
from __future__ import annotations

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def place(module: nn.Module, precision: str) -> tuple[nn.Module, torch.device, torch.dtype]:
    """Move an eval-mode module to the actor's device; half precision only on GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    return module.eval().to(device, dtype), device, dtype
