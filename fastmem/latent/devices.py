"""Where chapter 4's tensors live: one rule for picking the device (chapter 4)."""

from __future__ import annotations

import torch

from ..errors import ParameterError


def resolve_device(device) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; any other name or device is taken as given (chapter 4)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ParameterError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
