"""Conversions between adapters, all through one canonical form (`spec.LowRankAdapter`).

- `to_lowrank(adapter)`: any adapter as plain low-rank modules. Exact where the variant can give
  its factors (the `factors` hook); otherwise ΔW from the
  variant (with the base weights where it needs them) factored by truncated SVD at the asked rank,
  the relative error reported per module. `rank`/`energy` also resize exact factors, and with a
  base, turn matrices trained whole into low-rank changes (W' − W by SVD). A change an adapter
  makes to a layer's bias (an output scaling, a trained bias on B) cannot be factors: the new
  bias b + Δb travels whole, in the module's base layer as PEFT saves a trained bias (needs the base).
  Factors of a convolution kernel stored flattened (A r × in·kh·kw) become a conv LoRA's with the base;
  without one, a module named as a convolution is refused (`check_kernels_known`).
- `extract(model, base)`: a full fine-tune as a LoRA: each changed matrix's ΔW factored (a convolution's
  over its flattened kernels, as a conv LoRA: A r × in × *kernel, B out × r × 1…); changed
  vectors, and embeddings unless `embed_lora`, kept whole (`modules_to_save`).
- `write(lowrank, fmt, out)`: through the format plugin's `write`, atomically.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import registry, spec, validate
from ..adapter import read_adapter
from ..io.dtypes import code_to_torch, compute_dtype, parse_dtype
from ..devices import compute_device
from ..errors import AdaptkitError
from ..io.store import open_store
from .lowrank import Factored, factor_kernel, factor_matrix, factor_product, module_delta, settle_layout, stored_transposed
from ..hub.repos import resolve_path
from ..spec import AdapterFiles, LowRankAdapter, LowRankModule
from ..io.outputs import atomic_output, check_output

#: Names of embedding tables and output heads (whole tensors unless `embed_lora`).
EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                        r"embed_positions|shared|lm_head|embed_out)\.weight$")


@dataclass
class Report:
    """What a conversion did, per module: ranks and relative Frobenius errors."""

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)
    clamped: list[str] = field(default_factory=list)

    def add(self, module: str, f: Factored | None, rank: int, exact: bool) -> None:
        self.modules[module] = {"rank": rank, "error": 0.0 if f is None else f.error, "exact": exact}
        if f is not None and f.clamped:
            self.clamped.append(module)

    def as_dict(self) -> dict[str, Any]:
        errors = [m["error"] for m in self.modules.values()]
        return {"modules": self.modules, "saved": self.saved, "clamped": self.clamped,
                "max_error": max(errors, default=0.0), "mean_error": sum(errors) / len(errors) if errors else 0.0}

    def warn_clamped(self) -> None:
        if self.clamped:
            warnings.warn(f"rank above the matrix rank in {len(self.clamped)} module(s) (e.g. {self.clamped[0]}): "
                          "clamped to the matrix rank", stacklevel=3)


def _check_rank(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise AdaptkitError("give a rank or an energy fraction, not both")
    if rank is not None and rank < 1:
        raise AdaptkitError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise AdaptkitError(f"energy must be in (0, 1], got {energy}")


def _base_weight(base, module: str) -> torch.Tensor | None:
    if base is None:
        return None
    key = f"{module}.weight"
    if key not in base:
        raise AdaptkitError(f"the base model has no '{key}'; is it the adapter's base?")
    return base.get(key)


#: A layer named as a convolution: the last component of its path holds "conv" (PEFT's test models' conv1d and
#: conv2d, diffusers' and kohya's Stable Diffusion conv1, conv_shortcut, a downsampler's conv, quant_conv).
CONV_NAME = re.compile(r"(^|\.)[^.]*conv[^.]*$")


def _kernel_shaped(out: LowRankAdapter, base) -> None:
    """Factors of flattened convolution kernels (AdaLoRA's on Conv2d: A r × in·kh·kw) in a conv LoRA's
    shapes, where the base says the module is a convolution (`kernel_factors`)."""
    for module, m in out.modules.items():
        key = f"{module}.weight"
        m.a, m.b = kernel_factors(m.a, m.b, tuple(base.info(key).shape) if key in base else ())


def kernel_factors(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors of a convolution (A r × in·kh·kw, B out × r) as a conv LoRA holds them, A r × in × *kernel
    and B out × r × 1…, where the base weight's `shape` is a kernel they fit; else as they are."""
    if len(shape) > 2 and a.dim() == 2 and a.shape[1] == math.prod(shape[1:]) and b.shape[0] == shape[0]:
        return a.reshape(a.shape[0], *shape[1:]), b.reshape(shape[0], a.shape[0], *(1,) * (len(shape) - 2))
    return a, b


def check_kernels_known(flat: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuses, without a base model, (module, A) pairs whose A is flat (r × in, a Linear layer's) where the module
    is named as a convolution (`CONV_NAME`). Some variants store a convolution's kernel flattened into the input
    side (A r × in·kh·kw) and no kernel shape in the file, so that only the base weight tells a Linear layer
    from a convolution and gives the kernel: a Linear-shaped LoRA for a convolution loads nowhere."""
    for module, a in flat:
        if a.dim() == 2 and CONV_NAME.search(module):
            raise AdaptkitError(f"module {module} is a convolution whose kernel shape the file does not record "
                                "(stored flattened): pass --base (a recipe's base_model) to write it as a conv LoRA")


def _new_bias(variant, adapter: AdapterFiles, module: str, base) -> torch.Tensor | None:
    """The module's bias after the adapter (b + Δb) where the adapter changes it, else None. Factors
    cannot hold a bias change, so it travels whole; that needs the base model's bias."""
    if not isinstance(variant, spec.StoredBiasDelta):
        return None
    key = f"{module}.bias"
    bias = base.get(key) if base is not None and key in base else None
    change = variant.delta_bias(adapter, module, None if bias is None else bias.float())
    if change is None:
        return None
    if bias is None:
        raise AdaptkitError(f"{module}: the adapter changes the layer's bias too; "
                            + ("give --base, to save the new bias whole" if base is None else "the base has no bias there"))
    return (bias.float() + change).to(bias.dtype)


def to_lowrank(adapter: AdapterFiles, *, rank: int | None = None, energy: float | None = None,
               base: str | Path | None = None, allow_pickle: bool = False) -> tuple[LowRankAdapter, Report]:
    """`adapter` as plain low-rank modules (see the module docstring)."""
    _check_rank(rank, energy)
    variant = registry.get("variant", adapter.variant)
    if isinstance(variant, spec.MergeCheck):
        variant.check_mergeable(adapter)  # raises for adapters with no weight-space form
    base_store = open_store(resolve_path(str(base)), allow_pickle=allow_pickle) if base is not None else None
    base_config = validate.model_config(base_store.json_file("config.json"), base_store.root / "config.json") \
        if base_store is not None else None
    if base_store is not None:
        settle_layout(variant, adapter, base_config, base,
                      lambda module: base_store.get(f"{module}.weight") if f"{module}.weight" in base_store else None)
    out, report = LowRankAdapter.keeping(adapter.config), Report()
    resize = rank is not None or energy is not None
    for module in sorted(adapter.modules):
        bias = _new_bias(variant, adapter, module, base_store)
        if bias is not None:  # saved whole in the module's base layer, as PEFT saves a trained bias
            out.saved[f"{module}.bias"] = bias
            report.saved.append(f"{module}.bias")
        stored = _as_stored(variant, adapter, module) if not resize else None
        if stored is not None:  # lossless: tensors and alpha exactly as in the file
            out.modules[module] = stored
            report.add(module, None, stored.rank, True)
            continue
        exact = _exact_factors(variant, adapter, module)
        if exact is not None:
            a, b, s, layout = exact
            if a.shape[0] == 0:  # pruned to rank 0: no change, no module
                report.add(module, None, 0, True)
                continue
            if not resize:
                out.modules[module] = LowRankModule(a, b, out.alpha_for(s, a.shape[0]), **layout)
                report.add(module, None, a.shape[0], True)
                continue
            f = factor_product(a.float(), b.float(), s, rank, energy)
        else:
            if not resize:
                raise AdaptkitError(f"{module}: a {variant.name} module has no exact low-rank form"
                                    f"{_reason(variant, adapter, module)}; give --rank or --energy to factor its ΔW by SVD")
            layout = _svd_layout(variant, adapter, module, base_config)
            delta = module_delta(variant, adapter, module, _base_weight(base_store, module)).float()
            if delta.dim() > 2:  # a convolution kernel: a conv LoRA (LoCon)
                f, a, b = factor_kernel(delta, rank, energy)
                out.modules[module] = LowRankModule(a, b, float(f.rank))
                report.add(module, f, f.rank, False)
                continue
            f = factor_matrix(delta.T if layout["transposed"] else delta, rank, energy)
        out.modules[module] = LowRankModule(f.a, f.b, float(f.rank), **layout)
        report.add(module, f, f.rank, False)
    if base_store is not None:
        _kernel_shaped(out, base_store)
    else:
        check_kernels_known((module, m.a) for module, m in out.modules.items())
    if resize:
        out.plain_scaling()
    for key, name in adapter.saved.items():
        whole = adapter.store.get(name)
        if resize and base_store is not None and _factorable(key, whole, base_store):
            # A module trained whole, as a low-rank change of the base: ΔW = W' − W by SVD.
            module = key[: -len(".weight")]
            flip = bool(stored_transposed(base_config, module))
            delta = whole.float() - base_store.get(key).float()
            f = factor_matrix(delta.T if flip else delta, rank, energy)
            out.modules[module] = LowRankModule(f.a, f.b, float(f.rank), transposed=flip)
            report.add(module, f, f.rank, False)
            continue
        out.saved[key] = whole
        report.saved.append(key)
    report.warn_clamped()
    return out, report


def _svd_layout(variant, adapter: AdapterFiles, module: str, base_config: dict | None) -> dict[str, bool]:
    """How a module factored by SVD lies against its base weight: as the variant's `factor_layout` says where it
    knows the module (an embedding's ΔE = (B·A)ᵀ, written as an embedding LoRA), else as the settled layout.
    An embedding the base ties to its output head is refused: a LoRA there changes the input side only, where
    the change (trainable tokens) reached the head's logits too."""
    layout = {"embedding": False, "transposed": adapter.transposed.get(module, False)}
    try:
        if isinstance(variant, spec.Factors):
            layout = variant.factor_layout(adapter, module)
    except AdaptkitError:
        pass  # no exact factors for the module: its layout as settled from the base
    if layout["embedding"] and base_config and base_config.get("tie_word_embeddings", True):
        raise AdaptkitError(f"{module}: the base ties this embedding to its output head, which an embedding LoRA "
                            "leaves unchanged; merge the adapter into the base instead")
    return layout


def _factorable(key: str, tensor: torch.Tensor, base) -> bool:
    """A whole matrix (not an embedding table) the base also has, with the same shape."""
    return (tensor.dim() == 2 and key.endswith(".weight") and EMBEDDINGS.search(key) is None
            and key in base and tuple(base.info(key).shape) == tuple(tensor.shape))


def _as_stored(variant, adapter: AdapterFiles, module: str) -> LowRankModule | None:
    if not isinstance(variant, spec.LowRankStored):
        return None
    try:
        return variant.lowrank_module(adapter, module)
    except AdaptkitError:
        return None


def _reason(variant, adapter: AdapterFiles, module: str) -> str:
    """' (<the variant's reason>)' where its `lowrank_module` refuses the module, else ''."""
    try:
        if isinstance(variant, spec.LowRankStored):
            variant.lowrank_module(adapter, module)
    except AdaptkitError as err:
        return f" ({str(err).removeprefix(f'{module}: ')})"
    return ""


def _exact_factors(variant, adapter: AdapterFiles, module: str):
    """(A, B, s, layout) in the stored dtype where the variant has an exact low-rank form, else None."""
    if not isinstance(variant, spec.Factors):
        return None
    try:
        a, b, s = variant.factors(adapter, module)
    except AdaptkitError:
        return None  # e.g. a module rescaled by its base weight: factored by SVD instead
    roles = adapter.modules[module]
    stored = adapter.store.info(next(iter(roles.values()))).dtype
    dtype = parse_dtype(compute_dtype(stored))
    return a.to(dtype), b.to(dtype), float(s), variant.factor_layout(adapter, module)


def write(lowrank: LowRankAdapter, fmt: str, out: str | Path, *, force: bool = False,
          inputs: Iterable[str | Path | None] = ()) -> list[Path]:
    """Write `lowrank` in format `fmt` into the folder `out` (temporary folder, renamed at the end);
    `inputs` are the run's input paths (the output may not be inside one, nor hold one)."""
    plugin = registry.get("format", fmt)
    if not isinstance(plugin, spec.Writable):
        raise AdaptkitError(f"format '{fmt}' can be read but not written (writable: {', '.join(writable_formats())})")
    with atomic_output(out, force=force, inputs=inputs) as tmp:
        files = plugin.write(lowrank, tmp)
    return [Path(out) / Path(f).name for f in files]


def writable_formats() -> list[str]:
    return [n for n in registry.names("format") if isinstance(registry.get("format", n), spec.Writable)]


def convert(source: str | Path, to: str, out: str | Path, *, rank: int | None = None, energy: float | None = None,
            base: str | Path | None = None, force: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Read the adapter at `source` (any known format) and write it in format `to`; the report."""
    adapter = read_adapter(resolve_path(str(source)), allow_pickle=allow_pickle)
    if adapter is None:
        raise AdaptkitError(f"{source}: holds a full model, not an adapter (use `adaptkit extract` for fine-tunes)")
    check_output(out, force=force, inputs=[source, base])  # before the work, not after it
    plugin = registry.get("format", to)
    if rank is None and energy is None and adapter.variant in spec.option(plugin, "writes_variants"):
        files, report = _write_as_stored(adapter, plugin, out, force=force, inputs=[source, base])
    else:
        lowrank, report = to_lowrank(adapter, rank=rank, energy=energy, base=base, allow_pickle=allow_pickle)
        files = write(lowrank, to, out, force=force, inputs=[source, base])
    return {"source": str(source), "from": f"{adapter.format}/{adapter.variant}", "to": to,
            "files": [str(f) for f in files], **report.as_dict()}


def _write_as_stored(adapter: AdapterFiles, plugin, out, *, force: bool, inputs) -> tuple[list[Path], Report]:
    """An adapter whose variant the target format holds as it is (`spec.WritesVariants`): its tensors written
    unchanged, so exactly; the ranks in the report are the variant's own (`describe`)."""
    with atomic_output(out, force=force, inputs=inputs) as tmp:
        files = plugin.write_files(adapter, tmp)
    figures = registry.get("variant", adapter.variant).describe(adapter).get("modules", {})
    report = Report({m: {"rank": figures.get(m, {}).get("rank"), "error": 0.0, "exact": True}
                     for m in sorted(adapter.modules)})
    return [Path(out) / Path(f).name for f in files], report


def extract(model: str | Path, base: str | Path, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, embed_lora: bool = False, force: bool = False,
            allow_pickle: bool = False, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """A PEFT LoRA folder approximating `model` − `base` (see the module docstring); the report. Each ΔW is
    factored on `device` (`adaptkit.devices`: cpu, cuda, cuda:N, auto), read and written on the CPU."""
    where = compute_device(device)
    if rank is None and energy is None:
        raise AdaptkitError("give --rank R or --energy E")
    _check_rank(rank, energy)
    ft = open_store(resolve_path(str(model)), allow_pickle=allow_pickle)
    ref = open_store(resolve_path(str(base)), allow_pickle=allow_pickle)
    missing = [k for k in ref.keys() if k not in ft]
    if missing:
        raise AdaptkitError(f"the fine-tune lacks '{missing[0]}' of the base ({len(missing)} tensors); a different architecture?")
    config = ref.json_file("config.json") or {}
    check_output(out, force=force, inputs=[model, base])  # before the work, not after it
    lowrank = LowRankAdapter(config={"base_model_name_or_path": str(base)})
    report = Report()
    for name in tqdm(ref.keys(), unit="tensor", desc="extract", disable=not progress, leave=False):
        _extract_one(name, ft, ref, lowrank, report, rank, energy, embed_lora, config, where)
    report.warn_clamped()
    files = write(lowrank, registry.default("format"), out, force=force, inputs=[model, base])
    return {"model": str(model), "base": str(base), "files": [str(f) for f in files], **report.as_dict(),
            "device": str(where)}


def _changed(name: str, ft, ref, block_rows: int) -> bool:
    """Whether the fine-tune changed `name`, compared in row blocks (no full-size copies)."""
    shape = ref.info(name).shape
    if len(shape) < 2:
        return not torch.equal(ft.get(name), ref.get(name))
    return any(not torch.equal(ft.get(name, rows=(r, min(r + block_rows, shape[0]))),
                               ref.get(name, rows=(r, min(r + block_rows, shape[0]))))
               for r in range(0, shape[0], block_rows))


def _extract_one(name, ft, ref, lowrank, report, rank, energy, embed_lora, config, device) -> None:
    a_info, b_info = ft.info(name), ref.info(name)
    if a_info.shape != b_info.shape:
        raise AdaptkitError(f"'{name}': fine-tune {tuple(a_info.shape)} vs base {tuple(b_info.shape)}")
    if not code_to_torch(b_info.dtype).is_floating_point:
        return
    row = max(1, math.prod(b_info.shape[1:]))
    if not _changed(name, ft, ref, max(1, (1 << 20) // row)):
        return
    embedding = EMBEDDINGS.search(name) is not None
    is_matrix = len(b_info.shape) == 2 and name.endswith(".weight")
    if len(b_info.shape) in (3, 4, 5) and name.endswith(".weight"):  # a Conv1d/2d/3d kernel: a conv LoRA (LoCon)
        tuned = ft.get(name)
        f, a, b = factor_kernel((tuned.float() - ref.get(name).float()).to(device), rank, energy)
        lowrank.modules[name[: -len(".weight")]] = LowRankModule(a.to(tuned.dtype).cpu(), b.to(tuned.dtype).cpu(),
                                                                 float(f.rank))
        report.add(name[: -len(".weight")], f, f.rank, False)
        return
    if not is_matrix or (embedding and not embed_lora):
        lowrank.saved[name] = ft.get(name)  # kept whole, as stored
        report.saved.append(name)
        return
    tuned = ft.get(name)
    delta = tuned.float().sub_(ref.get(name).float()).to(device)
    module = name[: -len(".weight")]
    as_embedding = embedding and not name.endswith(("lm_head.weight", "embed_out.weight"))
    flip = as_embedding or bool(stored_transposed(config, module))  # math layout out × in
    f = factor_matrix(delta.T if flip else delta, rank, energy)
    lowrank.modules[module] = LowRankModule(f.a.to(tuned.dtype).cpu(), f.b.to(tuned.dtype).cpu(), float(f.rank),
                                            embedding=as_embedding, transposed=flip)
    report.add(module, f, f.rank, False)
