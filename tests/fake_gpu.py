"""A stand-in CUDA device for machines without one (a test helper, not a test).

Inside `fake_cuda()`, `torch.cuda.is_available()` is true and a tensor moved to "cuda" (`.to`, `.cuda`, a
factory given `device=`) becomes an `OnGpu` tensor: its data stays in CPU memory, so every number is the
CPU's, but it says `cuda:0` and follows CUDA's rules. An operation mixing it with a CPU tensor of one or
more dimensions fails as on a GPU ("Expected all tensors to be on the same device"), and so does
`.numpy()`. A CPU 0-dim tensor and Python numbers mix freely, as on a GPU. So code that runs here runs
on a GPU as far as where its tensors live goes; what a GPU's kernels compute (their rounding, their order
of summation) only a GPU can say (tests/test_cuda.py).
"""
from __future__ import annotations

import contextlib
import threading
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

GPU = torch.device("cuda", 0)


def _getter(func) -> str | None:
    """The property a function reads (`Tensor.device`'s getter: "device"), if it is a getter."""
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", None) if getattr(func, "__name__", "") == "__get__" else None


class OnGpu(torch.Tensor):
    """A tensor standing for one on the GPU (its data in CPU memory)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _getter(func) == "device":
            return GPU
        if _getter(func) == "is_cuda":
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


def _on_gpu(device) -> bool:
    return device is not None and not isinstance(device, torch.Tensor) and torch.device(device).type == "cuda"


def _target(func, args, kwargs) -> tuple[bool | None, object, tuple, dict]:
    """(True: the result is on the GPU, False: on the CPU, None: where the inputs are; the call to make,
    with any "cuda" replaced by "cpu")."""
    name = getattr(func, "__name__", "")
    if name in ("cpu", "cuda"):  # a move: .to("cpu") here
        return name == "cuda", torch.Tensor.to, args[:1], {"device": "cpu"}
    device = kwargs.get("device")
    if name == "to":
        moved = [a for a in args[1:] if isinstance(a, (str, torch.device))]
        device = moved[0] if moved else device
        if isinstance(device, torch.Tensor):  # .to(other): where the other is
            return type(device) is OnGpu, func, args, kwargs
        args = tuple(a for a in args if not isinstance(a, (str, torch.device)))
    if device is None:
        return None, func, args, kwargs
    return _on_gpu(device), func, args, {**kwargs, "device": "cpu"}


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _getter(func) in ("device", "is_cuda"):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        gpu = any(type(t) is OnGpu for t in tensors)
        if gpu and name == "numpy":
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        host = [tuple(t.shape) for t in tensors if type(t) is not OnGpu and t.dim() > 0]
        if gpu and host and name not in ("to", "copy_", "__setitem__"):  # (copies go between devices)
            raise RuntimeError(f"{name}: Expected all tensors to be on the same device, but found at least two "
                               f"devices, cuda:0 and cpu! (CPU tensors of shape {host})")
        there, call, args, kwargs = _target(func, args, kwargs)
        plain = tree_map(lambda t: t.as_subclass(torch.Tensor) if type(t) is OnGpu else t, (args, kwargs))
        out = call(*plain[0], **plain[1])
        if name in ("to", "cpu", "cuda") and there is not None and there != (type(args[0]) is OnGpu):
            out = out.clone() if out.data_ptr() == plain[0][0].data_ptr() else out  # a move copies
        if name == "copy_":  # in place: where the destination is
            return args[0]
        if there is None:  # where the inputs are (numbers read out of a tensor are numbers)
            there = gpu
        if not there or not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            return out  # (torch.Size and other values as they are)
        return tree_map(lambda t: t.as_subclass(OnGpu) if type(t) is torch.Tensor else t, out)


@contextlib.contextmanager
def fake_cuda():
    """Run the body as on a machine with one CUDA GPU (see the module docstring)."""
    run = threading.Thread.run

    def run_in_mode(thread):  # (torch function modes are per thread: the engine's workers enter it too)
        with _Mode():
            run(thread)

    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.device_count", return_value=1), \
            mock.patch.object(threading.Thread, "run", run_in_mode), _Mode():
        yield
