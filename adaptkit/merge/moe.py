"""Mixture of experts from dense models: mergekit-moe's YAML -> a Mixtral, DeepSeek, Qwen2-MoE or
Qwen3-MoE model (`adaptkit moe`).

Each layer of the output keeps the base model's attention, norms and embeddings and gets one
expert per `experts` entry: expert e's feed-forward block is that source model's MLP of the same
layer, and a router W_l of shape (experts, hidden) picks `experts_per_token` of them per token
(Mixtral of Experts, Jiang et al. 2024; from dense checkpoints as in sparse upcycling, Komatsuzaki et
al. 2023). `shared_experts` (DeepSeek, Qwen2-MoE) run on every token. The routers come from
`gate_mode` (`moe_gates`); which output, and where each tensor goes, from `moe_outputs`. Inputs are
models of one type and size. `noise_scale` adds N(0, noise_scale²) to each expert tensor and
`residual_scale` then multiplies its down projection, in that order, as mergekit does; one seeded
generator draws the random gates first (shared experts' rows after the experts') and then the noise
in the output's order, so a seed gives mergekit's numbers under its `--random-seed`.

The tensors stream one at a time from the inputs into the output's layout.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..devices import compute_device
from ..errors import AdaptkitError
from ..io import readers
from ..io.dtypes import code_to_torch, torch_to_code
from ..io.outputs import atomic_output, check_output
from ..io.writer import DEFAULT_SHARD_SIZE, ShardedWriter
from .card import CARD, moe_card
from .moe_config import CONFIG_KEYS, EXPERT_KEYS, MoeConfig, dtype_of, load_moe_config
from .moe_gates import HIDDEN_MODES, RANDOM_MODES, conditions, degenerate_layers, gate_vectors, similarity
from .moe_outputs import ATTENTION, EXTRA_ATTENTION, MIXTRAL, SOURCE_TYPES, Output, named
from .sources import ModelSource, open_input
from .tokenizer import TOKENIZER_FILES, copy_tokenizer

_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOKENIZER_FILES = (*TOKENIZER_FILES, "generation_config.json")  # (the base's, copied as they are)


class MoePlan:
    """The inputs opened and checked against each other, the output chosen, and its tensors (names,
    dtypes, shapes)."""

    def __init__(self, config: MoeConfig, *, allow_pickle: bool = False, dtype: str | None = None):
        self.config = config
        opened: dict[str, ModelSource] = {}
        for ref in (config.base, *(e.ref for e in (*config.experts, *config.shared))):
            if str(ref) not in opened:
                opened[str(ref)] = open_input(ref, allow_pickle=allow_pickle)
        self.base = opened[str(config.base)]
        if config.base.adapters and config.gate_mode in HIDDEN_MODES:
            raise AdaptkitError(f"base_model {config.base}: the hidden states come from the model as saved; merge "
                                "the adapter into it first (adaptkit merge), or use gate_mode cheap_embed or random")
        self.experts = [opened[str(e.ref)] for e in config.experts]
        self.shared = [opened[str(e.ref)] for e in config.shared]
        base_cfg = self._check_types(list(opened.values()))
        self.base_config = base_cfg
        self.output = self._select(base_cfg["model_type"])
        self.layers, self.hidden = base_cfg["num_hidden_layers"], base_cfg["hidden_size"]
        given = dtype or config.dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype")
        self.out_dtype = dtype_of(given, "dtype") if given else None
        self.kept = self._base_tensors(base_cfg["model_type"])
        #: (name, the weight it sits beside) of tensors the output needs and the base lacks: zeros
        self.zeros = [(name, name.removesuffix(".bias") + ".weight") for layer in range(self.layers)
                      for part in self.output.zeros if (name := f"model.layers.{layer}.{part}") not in self.kept]
        self.ffn = base_cfg.get("intermediate_size")
        for expert, source in zip(config.experts, self.experts):
            self._check_expert(f"expert {expert.ref}", source)
        for expert, source in zip(config.shared, self.shared):
            self._check_expert(f"shared expert {expert.ref}", source)

    def _check_types(self, sources: list[ModelSource]) -> dict:
        for source in sources:
            if not source.config:
                raise AdaptkitError(f"{source.ref}: no config.json, so its architecture is unknown")
            kind = source.config.get("model_type")
            if kind not in SOURCE_TYPES:
                raise AdaptkitError(f"{source.ref} is a {kind} model; adaptkit moe (as mergekit-moe) takes "
                                    f"{', '.join(SOURCE_TYPES)} models")
        kinds = {s.config["model_type"] for s in sources}
        if len(kinds) > 1:
            raise AdaptkitError(f"the models mix {' and '.join(sorted(kinds))}; a mixture of experts is made from "
                                "one type")
        base_cfg = self.base.config
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            if not isinstance(base_cfg.get(key), int):
                raise AdaptkitError(f"{self.base.ref}: config.json has no {key}")
        return base_cfg

    def _select(self, model_type: str) -> Output:
        """mergekit-moe's choice: of the outputs `architecture` names that take the config, Mixtral if it
        does, else the first (with a warning where another would take it too)."""
        config = self.config
        outputs = named(config.architecture)
        refusals = {o.name: o.refusal(model_type, config.shared, config.gate_mode) for o in outputs}
        fits = [o for o in outputs if refusals[o.name] is None]
        if not fits:
            raise AdaptkitError("no mergekit-moe output takes this config: " +
                                "; ".join(f"{name} {why}" for name, why in refusals.items()))
        if len(fits) > 1 and fits[0] is not MIXTRAL:
            warnings.warn(f"{' and '.join(o.name for o in fits)} both take this config; writing {fits[0].name}, as "
                          "mergekit does (set architecture to choose)", stacklevel=3)
        return fits[0]

    def _out_code(self, code: str) -> str:
        return torch_to_code(self.out_dtype) if self.out_dtype is not None else code

    def _base_tensors(self, model_type: str) -> list[str]:
        """The base's tensors the output keeps; any other than its MLPs has no place in the output."""
        keep = {*ATTENTION, *EXTRA_ATTENTION.get(model_type, ())}
        kept = []
        for name in self.base.keys():
            m = _LAYER.fullmatch(name)
            if name in _TOP or (m and m.group(2) in keep):
                kept.append(name)
            elif m and (m.group(2).startswith("mlp.") and m.group(2).endswith("_proj.weight")
                        or m.group(2) == "self_attn.rotary_emb.inv_freq"):  # a buffer the model recomputes
                continue
            else:
                raise AdaptkitError(f"{self.base.ref}: tensor '{name}' has no place in a {self.output.name} model; "
                                    "refused")
        for layer in range(self.layers):
            for part in sorted(keep):
                if f"model.layers.{layer}.{part}" not in kept:
                    raise AdaptkitError(f"{self.base.ref}: tensor 'model.layers.{layer}.{part}' is missing")
        return kept

    def _check_expert(self, what: str, source: ModelSource) -> None:
        want = {"gate_proj": (self.ffn, self.hidden), "up_proj": (self.ffn, self.hidden),
                "down_proj": (self.hidden, self.ffn)}
        names = set(source.keys())
        for layer in range(self.layers):
            for proj in self.output.order:
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                if name not in names:
                    raise AdaptkitError(f"{what}: tensor '{name}' is missing (fewer layers than the base?)")
                if source.info(name).shape != want[proj]:
                    raise AdaptkitError(f"{what}: '{name}' has shape {source.info(name).shape}, the base's "
                                        f"config needs {want[proj]}")

    def expert_tensors(self):
        """(output name, Expert, its source, source tensor, is the down projection) of every expert
        tensor, shared experts' too, in the order mergekit draws their noise for this output."""
        out = self.output
        members = [*zip(self.config.experts, self.experts), *zip(self.config.shared, self.shared)]
        for layer in range(self.layers):
            order = ([(i, p) for p in out.order for i in range(len(members))] if out.by_projection
                     else [(i, p) for i in range(len(members)) for p in out.order])
            for i, proj in order:
                name = (out.expert_name(layer, i, proj) if i < len(self.experts)
                        else out.shared_expert.format(layer=layer, proj=proj))
                yield (name, *members[i], f"model.layers.{layer}.mlp.{proj}.weight", proj == "down_proj")

    def layout(self, gate_code: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype code, shape) of every output tensor; gates in `gate_code` unless a dtype is set."""
        info = self.base.info
        rows = [(n, self._out_code(info(n).dtype), info(n).shape) for n in self.kept]
        rows += [(n, self._out_code(info(w).dtype), info(w).shape[:1]) for n, w in self.zeros]
        for layer in range(self.layers):
            rows.append((self.output.router_name(layer), self._out_code(gate_code), (len(self.experts), self.hidden)))
            if self.output.shared_gate:
                rows.append((self.output.shared_gate.format(layer=layer), self._out_code(gate_code),
                             (len(self.shared), self.hidden)))
        for name, _, source, tensor, _ in self.expert_tensors():
            rows.append((name, self._out_code(source.info(tensor).dtype), source.info(tensor).shape))
        return sorted(rows, key=lambda row: _natural(row[0]))

    def output_config(self) -> dict:
        """The base's config.json as the output's, as mergekit writes it."""
        dtype = str(self.out_dtype).split(".")[-1] if self.out_dtype is not None else None
        return self.output.config(self.base_config, len(self.experts), len(self.shared),
                                  self.config.experts_per_token, dtype)

    def summary(self) -> dict[str, Any]:
        layout = self.layout("BF16" if self.config.gate_mode in HIDDEN_MODES else "F32")
        return {"architecture": self.output.architecture, "output_kind": self.output.name,
                "base": str(self.config.base),
                "experts": [str(e.ref) for e in self.config.experts],
                "shared_experts": [str(e.ref) for e in self.config.shared], "gate_mode": self.config.gate_mode,
                "experts_per_token": self.config.experts_per_token, "layers": self.layers, "tensors": len(layout),
                "parameters": sum(math.prod(s) for _, _, s in layout),
                "output_bytes": sum(math.prod(s) * code_to_torch(d).itemsize for _, d, s in layout),
                "dtype": str(self.out_dtype).split(".")[-1] if self.out_dtype is not None else None}


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def check_base_bits(config: MoeConfig, bits: int | None) -> None:
    """mergekit-moe's --load-in-4bit / --load-in-8bit (`bits`) quantize the base it runs for hidden-state
    gates; any other gate mode loads no model, and the option would change nothing: refused by name."""
    if bits not in (None, 4, 8):
        raise AdaptkitError(f"the base can be loaded in 4 or 8 bits for the hidden states, not {bits}")
    if bits is not None and config.gate_mode not in HIDDEN_MODES:
        raise AdaptkitError(f"--load-in-{bits}bit quantizes the base run for hidden-state gates (gate_mode hidden or "
                            f"hidden_avg); gate_mode {config.gate_mode} runs no model")


def build_moe(config: MoeConfig, out: str | Path, *, force: bool = False, seed: int | None = None,
              dtype: str | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE, device: str = "cpu",
              base_bits: int | None = None, allow_pickle: bool = False, progress: bool = False,
              card: bool = True) -> dict[str, Any]:
    """Write the mixture of experts `config` describes into the folder `out` (whole or not at all), with a
    model card (README.md) and the config as given (mergekit_moe_config.yml) unless `card` is false;
    returns a report (the CLI's --json, which draws its routers with --plot). `base_bits` (4 or 8): the
    base runs for hidden gates quantized by bitsandbytes (`check_base_bits`)."""
    import torch

    check_base_bits(config, base_bits)
    device = str(compute_device(device))  # (refused before any work where this machine lacks it)
    start = time.perf_counter()
    check_output(out, force=force, inputs=config.inputs())  # before the hidden pass, not after it
    plan = MoePlan(config, allow_pickle=allow_pickle, dtype=dtype)
    generator = torch.Generator()
    seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
    embed = plan.base.get("model.embed_tokens.weight", float32=False) if config.gate_mode == "cheap_embed" else None
    gates = gate_vectors(config.gate_mode, config.gated(), layers=plan.layers, hidden=plan.hidden,
                         base_folder=plan.base.root, embed=embed, generator=generator, device=device,
                         base_bits=base_bits)
    conds, alike = conditions(gates), similarity(gates)
    degenerate = degenerate_layers(conds)
    report = {**plan.summary(), "base_bits": base_bits}  # (the routers depend on it: the card says so)
    with atomic_output(out, force=force, inputs=config.inputs()) as tmp:
        (tmp / "config.json").write_text(readers.dump_json(plan.output_config(), tmp / "config.json"))
        copy_tokenizer(plan.base.root, tmp, _TOKENIZER_FILES)
        if card:
            (tmp / CARD).write_text(moe_card(config, report, config.text), encoding="utf-8")
            if config.text is not None:
                (tmp / "mergekit_moe_config.yml").write_text(config.text, encoding="utf-8")
        layout = plan.layout(torch_to_code(gates.dtype))
        writer = ShardedWriter(tmp, layout, shard_size=shard_size,
                               metadata={"format": "pt", "adaptkit.moe_gate_mode": config.gate_mode})
        try:
            with tqdm(total=len(layout), unit="tensor", desc="moe", disable=not progress, leave=False) as bar:
                _stream(plan, writer, {name: code_to_torch(code) for name, code, _ in layout}, gates, generator, bar)
        except BaseException:
            writer.abort()
            raise
        files = writer.close()
    randomized = config.gate_mode in RANDOM_MODES or any(e.noise_scale is not None
                                                         for e in (*config.experts, *config.shared))
    report.update(output=str(out), files=[f.name for f in files], seed=seed if randomized else None,
                  degenerate_layers=degenerate, router_conditions=[round(c, 4) if math.isfinite(c) else None
                                                                   for c in conds],
                  router_similarity=[[round(v, 4) for v in row] for row in alike],
                  seconds=round(time.perf_counter() - start, 3))
    return report


def _stream(plan: MoePlan, writer: ShardedWriter, dtypes: dict, gates, generator, bar) -> None:
    """The base's tensors (and zeros the output needs), then the experts' (noise drawn in the output's
    order, `MoePlan.expert_tensors`), then per layer the router and the shared experts' gate."""
    import torch

    def write(name: str, tensor) -> None:
        writer.write(name, tensor.to(dtypes[name]))
        bar.update()

    for name in plan.kept:
        write(name, plan.base.get(name, float32=False))
    for name, weight in plan.zeros:
        write(name, torch.zeros(plan.base.info(weight).shape[:1], dtype=dtypes[name]))
    for name, expert, source, tensor_name, down in plan.expert_tensors():
        tensor = source.get(tensor_name, float32=False)  # (with a LoRA: merged in, stored as the model is, as mergekit)
        if expert.noise_scale is not None:
            noise = torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator)
            tensor = tensor + noise * expert.noise_scale
        if down and expert.residual_scale is not None:
            tensor = tensor * expert.residual_scale
        write(name, tensor)
    routed = len(plan.experts)
    for layer in range(plan.layers):
        write(plan.output.router_name(layer), gates[layer, :routed].contiguous())
        if plan.output.shared_gate:
            write(plan.output.shared_gate.format(layer=layer), gates[layer, routed:].contiguous())


__all__ = ["CONFIG_KEYS", "EXPERT_KEYS", "MoeConfig", "MoePlan", "build_moe", "load_moe_config"]
