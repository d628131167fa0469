"""Where tensor arithmetic runs (`--device`): the CPU, a CUDA GPU, or `auto` (a GPU where there is one).

Files are read and written on the CPU whatever the device: a command moves each piece of work there
and its result back. A device this machine does not have is refused before any work, in one line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import AdaptkitError

if TYPE_CHECKING:
    import torch

CHOICES = "cpu, cuda, cuda:N or auto"


def compute_device(name: str | torch.device | None) -> torch.device:
    """The torch.device `name` says (None: the CPU); `auto` is the first CUDA GPU, else the CPU."""
    import torch

    text = "cpu" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise AdaptkitError(f"--device: '{name}' is no device ({CHOICES})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise AdaptkitError(f"--device: {device.type} is not supported ({CHOICES})")
    if not torch.cuda.is_available():
        raise AdaptkitError(f"--device {text}: this machine has no CUDA GPU that torch can use (torch "
                            f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); use --device cpu")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise AdaptkitError(f"--device {text}: this machine has {count} CUDA GPU(s), numbered from 0")
    return torch.device("cuda", index)
