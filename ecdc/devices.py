"""Which torch device to run on, from what the user asked for (``--device``).

Its own module so that training, which needs the same rule, does not import the codec.
"""

from __future__ import annotations

import torch

from .errors import ModelError


def resolve_device(device: str = "cpu") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("CUDA was requested but no CUDA device is available (use --device cpu)", where="")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
