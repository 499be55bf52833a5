"""Device names checked up front: an unknown name, or an accelerator this torch build or machine does
not have, is a one-line user error (not a traceback from deep inside torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import OneGenError

if TYPE_CHECKING:
    import torch


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, or `OneGenError` saying why it cannot be used here."""
    import torch  # here, not at import: the CLI parses its arguments before loading torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OneGenError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps", field="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device is visible"
            raise OneGenError(f"device {str(device)!r} asked for, but this machine has {build} "
                              f"(torch {torch.__version__}); use --device cpu", field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OneGenError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible", field="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OneGenError(f"device {str(device)!r} asked for, but MPS is not available here", field="device")
    return dev


def device_arg(name: str) -> str:
    """An argparse type: a device this machine has (refused before any work otherwise), kept as given."""
    import argparse

    try:
        check_device(name)
    except OneGenError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return name


__all__ = ["check_device", "device_arg"]
