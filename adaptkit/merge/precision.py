"""Which dtypes a merge loads, computes and writes in: mergekit's meaning of `dtype`, plus `compute_dtype`.

mergekit 0.1.5 (the anchor; read from its source):
- `dtype` is the dtype tensors are loaded in: each input tensor is converted to it on loading
  (`io/tasks.py` LoadTensor); without `dtype` it stays as stored, and a method's inputs are first
  promoted to one dtype (`merge_methods/dtype.py`: bfloat16 with float16 gives float32).
- Each method computes in that dtype, upcasting only where its kernel says so: some accumulate in
  float32 and round once to the inputs' dtype, others round every step in it (each merge plugin's
  docstring says which, and follows mergekit's order of operations to give its bytes).
- `out_dtype` is the dtype tensors are written in (`SaveTensor`); without it they are written as the
  method returned them (the loaded dtype). config.json's `dtype` (`torch_dtype`) is set to `out_dtype`,
  else `dtype`, else kept as the base model's (without a base, the first model's).

adaptkit means the same by `dtype` and `out_dtype`, and adds `compute_dtype`: the dtype tensors are
converted to instead of `dtype` (`compute_dtype: float32` computes in float32 from the inputs as
stored and rounds once to the output dtype: more exact than mergekit, not its bytes). The output dtype
is `out_dtype`, else `dtype`, else the inputs' promoted stored dtype; config.json says it. An input
with adapter deltas (`model+adapter`) is, as in mergekit, the model with the adapter merged in and
stored as the model stores it: ΔW added in float32 and rounded once to the stored dtype (mergekit's
LoRA merge writes such a model, transformers 5 loading it as stored), then converted like any input;
with `compute_dtype` the sum is converted to the compute dtype alone (a bf16 model + LoRA computed in
float32 keeps W + ΔW unrounded).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdaptkitError
from ..io.dtypes import COMPUTE, code_to_torch, parse_dtype
from ..io.readers import update_json

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe


MERGE_DTYPES = (*COMPUTE, "float64")  # mergekit merges in float64 too (inputs stored in it: as stored)


def recipe_dtypes(recipe: Recipe, quantized: bool) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(output dtype, compute dtype) a recipe asks for; None: the inputs' promoted stored dtype.
    A quantized input has no stored dtype to keep: computed in float32, written in bfloat16 unless asked."""
    import torch

    for key in ("dtype", "out_dtype", "compute_dtype"):
        name = getattr(recipe, key)
        if name is not None and _parsed(name) not in [getattr(torch, d) for d in MERGE_DTYPES]:
            raise AdaptkitError(f"{key} must be one of {', '.join(MERGE_DTYPES)}, got '{name}'")
    out = parse_dtype(recipe.out_dtype or recipe.dtype or ("bfloat16" if quantized else None))
    compute = parse_dtype(recipe.compute_dtype or recipe.dtype or ("float32" if quantized else None))
    return out, compute


def _parsed(name: str) -> torch.dtype | None:
    try:
        return parse_dtype(name)
    except AdaptkitError:
        return None


def stored_dtype(codes: list[str]) -> torch.dtype:
    """The dtype mergekit promotes a method's inputs to (safetensors dtype codes in)."""
    import torch

    dtype = code_to_torch(codes[0])
    for code in codes[1:]:
        dtype = torch.promote_types(dtype, code_to_torch(code))
    return dtype


def state_dtype(folder: Path, dtype: torch.dtype) -> None:
    """config.json's `dtype` (and `torch_dtype`, where the file has that older key) set to `dtype`."""
    name = str(dtype).removeprefix("torch.")

    def change(config: dict) -> None:
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name

    update_json(folder / "config.json", change)


def drop_quantization_config(folder: Path) -> None:
    """An unpacked output keeps the base's config.json minus `quantization_config` (which transformers
    would otherwise act on when loading the floating-point weights)."""
    update_json(folder / "config.json", lambda config: config.pop("quantization_config", None) is not None)


def all_finite(tensor: torch.Tensor) -> bool:
    """NaN and ±Inf propagate into a sum, so one fast reduction settles the usual all-finite case;
    only a non-finite sum (which large finite values can also give) needs the exact check."""
    return bool(tensor.sum().isfinite()) or bool(tensor.isfinite().all())


def nonfinite_output(name: str, method: str, compute: torch.dtype, written: torch.dtype) -> AdaptkitError:
    """The error for a merged tensor, as written, that holds NaN or ±Inf although its inputs did not (the
    engine checked them): a model with them is broken. Half precision is the usual cause: mergekit's own
    steps overflow or underflow there (multislerp's ε = 1e-8 is 0 in float16, and identical inputs,
    such as untouched norms, then give 0/0) and it writes what they give."""
    return AdaptkitError(f"merging '{name}' with {method} gave NaN or Inf values from finite inputs (computed in "
                         f"{str(compute).removeprefix('torch.')}, written as {str(written).removeprefix('torch.')}): "
                         f"--compute-dtype float32 may avoid them; --allow-nonfinite writes them")
