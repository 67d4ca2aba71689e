"""Choosing where torch runs: CUDA when present and asked for, CPU otherwise."""

from __future__ import annotations

import logging

from ..errors import OrthoKneeError, advised_message

__all__ = ["DeviceError", "select_device"]

_log = logging.getLogger(__name__)


class DeviceError(OrthoKneeError):
    """The requested device does not exist on this machine."""

    def __init__(self, problem: str, advice: str = "") -> None:
        super().__init__(advised_message(None, problem, advice))
        self.problem, self.advice = problem, advice


def select_device(requested: str = "auto"):
    """'auto' -> CUDA if available else CPU; 'cuda' on a CUDA-less machine is a clear error.

    Asking for CUDA explicitly and silently getting the CPU would make a 10-second job take
    minutes without telling anyone why, so only 'auto' falls back.
    """
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was requested but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).",
                "Use device 'auto' or 'cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU.",
            )
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {requested!r}.", "Use 'auto', 'cpu' or 'cuda'.")
