"""Mixture of experts from dense models: mergekit-moe's YAML -> a Mixtral model (`adaptkit moe`).

Each layer of the output keeps the base model's attention, norms and embeddings and gets one
expert per `experts` entry: expert e's feed-forward block is that source model's MLP of the same
layer (gate_proj -> w1, down_proj -> w2, up_proj -> w3, Mixtral's names), and a router W_l of
shape (experts, hidden) picks `experts_per_token` of them per token (Mixtral of Experts, Jiang et
al. 2024; from dense checkpoints as in sparse upcycling, Komatsuzaki et al. 2023). The router
comes from `gate_mode` (`moe_gates`). Inputs are Llama or Mistral models of one type and size,
as for mergekit's Mixtral output; its DeepSeek and Qwen outputs (and so `shared_experts`) are
refused by name. `noise_scale` adds N(0, noise_scale²) to each expert tensor and `residual_scale`
then multiplies w2, in that order, as mergekit does; one seeded generator draws the random gates
first and then the noise layer by layer, expert by expert, w1, w2, w3, so a seed gives mergekit's
numbers under its `--random-seed`.

The tensors stream one at a time from the inputs into the classic Mixtral layout
(`block_sparse_moe.experts.E.w1.weight`), which transformers 4 and 5 and llama.cpp read.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import AdaptkitError, short, unknown_name
from ..io import readers
from ..io.dtypes import code_to_torch, parse_dtype, torch_to_code
from ..io.outputs import atomic_output, check_output
from ..io.paths import inside, regular_file
from ..io.writer import DEFAULT_SHARD_SIZE, ShardedWriter
from .moe_gates import GATE_MODES, HIDDEN_MODES, RANDOM_MODES, degenerate_layers, gate_vectors
from .recipe import Ref
from .sources import ModelSource, open_input

CONFIG_KEYS = frozenset({"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
                         "architecture"})
EXPERT_KEYS = frozenset({"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"})
#: mergekit-moe's other output architectures, matched as it matches them (by prefix).
OTHER_OUTPUTS = ("deepseek", "qwen", "qwen3")
SOURCE_TYPES = ("llama", "mistral")
#: (source MLP projection, Mixtral expert weight), in mergekit's order (the noise is drawn in it).
PROJECTIONS = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
_KEPT = frozenset({"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                   "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"})
_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
#: Keys of the base's config.json that do not describe the output.
_DROPPED = ("architectures", "model_type", "torch_dtype", "dtype", "auto_map", "_name_or_path", "quantization_config")
#: MixtralConfig's own defaults, written where the base (a Llama or Mistral config) has none.
_MIXTRAL_DEFAULTS = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}


@dataclass
class Expert:
    ref: Ref
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeConfig:
    base: Ref
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    text: str | None = None  # the YAML as given, kept beside the output as mergekit keeps it

    def inputs(self) -> list[str]:
        refs = [self.base, *(e.ref for e in self.experts)]
        return [path for ref in refs for path in (ref.model, *ref.adapters)]


def load_moe_config(source: str | Path | dict, *, allow_same: bool = False) -> MoeConfig:
    """Read and check a mergekit-moe config (YAML file or dict). Every key is used or refused by
    name; mergekit's sanity checks apply (prompts for prompt-based gates, experts told apart)."""
    text = None
    if isinstance(source, dict):
        data, src = source, "moe config"
    else:
        path = regular_file(source, "moe config")
        text = readers.decode(path.read_bytes(), path)  # read once: parsed here, copied into the output
        data, src = readers.load_yaml(text, path), str(path)
    if not isinstance(data, dict):
        raise AdaptkitError(f"{src}: a moe config is a mapping with 'base_model' and 'experts', got {short(data)}")
    _check_keys(src, data, CONFIG_KEYS)
    for key in ("base_model", "experts"):
        if key not in data:
            raise AdaptkitError(f"{src}: '{key}' is missing")
    _check_output(src, data)
    entries = data["experts"]
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError(f"{src}: experts must be a non-empty list, got {short(entries)}")
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise unknown_name("gate_mode", str(mode), GATE_MODES)
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise AdaptkitError(f"{src}: experts_per_token must be an integer ≥ 1, got {short(per_token)}")
    dtype = data.get("dtype")
    if dtype is not None:
        _dtype(dtype, f"{src}: dtype")
    config = MoeConfig(Ref.parse(data["base_model"], f"{src}: base_model"),
                       [_expert(f"{src}: experts[{i}]", e) for i, e in enumerate(entries)],
                       mode, dtype, per_token, text)
    _check_sense(config, src, allow_same)
    return config


def _check_keys(where: str, given: dict, allowed: frozenset[str]) -> None:
    for key in given:
        if key not in allowed:
            raise unknown_name(f"key in {where}:", str(key), allowed)


def _check_output(src: str, data: dict) -> None:
    """Only mergekit's Mixtral output is written: `architecture` must name it (mergekit matches a
    prefix of the name), and shared experts, which Mixtral has no place for, are refused."""
    if data.get("shared_experts"):
        raise AdaptkitError(f"{src}: shared_experts need mergekit's deepseek or qwen output; adaptkit moe writes "
                            "Mixtral, which has none")
    arch = data.get("architecture")
    if arch is None or arch == "":
        return
    if not isinstance(arch, str):
        raise AdaptkitError(f"{src}: architecture must be a name, got {short(arch)}")
    if "mixtral".startswith(arch.lower()):
        return
    other = [name for name in OTHER_OUTPUTS if name.startswith(arch.lower())]
    if other:
        raise AdaptkitError(f"{src}: architecture '{arch}' ({other[0]}) is a mergekit-moe output adaptkit does "
                            "not write; only mixtral")
    raise unknown_name("moe architecture", arch, ("mixtral", *OTHER_OUTPUTS))


def _expert(where: str, entry: Any) -> Expert:
    if not isinstance(entry, dict):
        raise AdaptkitError(f"{where} must be a mapping with 'source_model', got {short(entry)}")
    _check_keys(where, entry, EXPERT_KEYS)
    if "source_model" not in entry:
        raise AdaptkitError(f"{where}: 'source_model' is missing")
    prompts = {key: _prompts(entry.get(key), f"{where}: {key}") for key in ("positive_prompts", "negative_prompts")}
    scales = {key: _number(entry.get(key), f"{where}: {key}") for key in ("noise_scale", "residual_scale")}
    return Expert(Ref.parse(entry["source_model"], f"{where}: source_model"), prompts["positive_prompts"],
                  prompts["negative_prompts"], scales["noise_scale"], scales["residual_scale"])


def _prompts(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AdaptkitError(f"{what} must be a list of strings, got {short(value)}")
    return value


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdaptkitError(f"{what} must be a finite number, got {short(value)}")
    return float(value)


def _dtype(name: Any, what: str):
    if not isinstance(name, str):
        raise AdaptkitError(f"{what} must be a dtype name, got {short(name)}")
    try:
        return parse_dtype(name.removeprefix("torch."))
    except AdaptkitError as e:
        raise AdaptkitError(f"{what}: {e}") from None


def _check_sense(config: MoeConfig, src: str, allow_same: bool) -> None:
    """mergekit-moe's `is_bad_config`: enough experts; for gates from prompts, prompts for every
    expert that are not all the same, and experts that are not all one model (else the MoE computes
    what one model does, with more memory: `allow_same` for models that will be trained further).
    mergekit exempts only `random`; `uniform_random` needs no prompts either here."""
    n, k = len(config.experts), config.experts_per_token
    if n < k:
        raise AdaptkitError(f"{src}: {n} expert(s) but experts_per_token is {k}; give at least as many experts")
    if config.gate_mode in RANDOM_MODES:
        if any(e.positive or e.negative for e in config.experts):
            warnings.warn(f"{src}: gate_mode {config.gate_mode} does not use the experts' prompts", stacklevel=3)
        return
    for i, expert in enumerate(config.experts):
        if not expert.positive:
            raise AdaptkitError(f"{src}: experts[{i}] has no positive_prompts, which gate_mode "
                                f"{config.gate_mode} routes by")
    prompts = {(tuple(e.positive), tuple(e.negative)) for e in config.experts}
    if len(prompts) == 1 and n > 1:
        raise AdaptkitError(f"{src}: every expert has the same prompts, so the router cannot tell them apart")
    if not allow_same and n > 1 and len({str(e.ref) for e in config.experts}) == 1:
        raise AdaptkitError(f"{src}: every expert is {config.experts[0].ref}: the MoE would compute what that "
                            "model does (pass --allow-same-experts to make it anyway, e.g. to train it further)")


class MoePlan:
    """The inputs opened and checked against each other, and the output's tensors (names, dtypes, shapes)."""

    def __init__(self, config: MoeConfig, *, allow_pickle: bool = False, dtype: str | None = None):
        self.config = config
        opened: dict[str, ModelSource] = {}
        for ref in (config.base, *(e.ref for e in config.experts)):
            if str(ref) not in opened:
                opened[str(ref)] = open_input(ref, allow_pickle=allow_pickle)
        self.base = opened[str(config.base)]
        if config.base.adapters and config.gate_mode in HIDDEN_MODES:
            raise AdaptkitError(f"base_model {config.base}: the hidden states come from the model as saved; merge "
                                "the adapter into it first (adaptkit merge), or use gate_mode cheap_embed or random")
        self.experts = [opened[str(e.ref)] for e in config.experts]
        base_cfg = self._check_types(list(opened.values()))
        self.base_config = base_cfg
        self.layers, self.hidden = base_cfg["num_hidden_layers"], base_cfg["hidden_size"]
        given = dtype or config.dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype")
        self.out_dtype = _dtype(given, "dtype") if given else None
        self.kept = self._base_tensors()
        self.ffn = base_cfg.get("intermediate_size")
        for expert, source in zip(config.experts, self.experts):
            self._check_expert(expert.ref, source)

    def _check_types(self, sources: list[ModelSource]) -> dict:
        for source in sources:
            if not source.config:
                raise AdaptkitError(f"{source.ref}: no config.json, so its architecture is unknown")
            kind = source.config.get("model_type")
            if kind not in SOURCE_TYPES:
                raise AdaptkitError(f"{source.ref} is a {kind} model; adaptkit moe (as mergekit's Mixtral output) "
                                    f"takes {' or '.join(SOURCE_TYPES)} models")
        kinds = {s.config["model_type"] for s in sources}
        if len(kinds) > 1:
            raise AdaptkitError(f"the models mix {' and '.join(sorted(kinds))}; a Mixtral is made from one type")
        base_cfg = self.base.config
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            if not isinstance(base_cfg.get(key), int):
                raise AdaptkitError(f"{self.base.ref}: config.json has no {key}")
        return base_cfg

    def _out_code(self, code: str) -> str:
        return torch_to_code(self.out_dtype) if self.out_dtype is not None else code

    def _base_tensors(self) -> list[str]:
        """The base's tensors the output keeps; any other than its MLPs has no place in a Mixtral."""
        kept = []
        for name in self.base.keys():
            m = _LAYER.fullmatch(name)
            if name in _TOP or (m and m.group(2) in _KEPT):
                kept.append(name)
            elif m and (m.group(2).startswith("mlp.") and m.group(2).endswith("_proj.weight")
                        or m.group(2) == "self_attn.rotary_emb.inv_freq"):  # a buffer the model recomputes
                continue
            else:
                raise AdaptkitError(f"{self.base.ref}: tensor '{name}' has no place in a Mixtral model; refused")
        for layer in range(self.layers):
            for part in sorted(_KEPT):
                if f"model.layers.{layer}.{part}" not in kept:
                    raise AdaptkitError(f"{self.base.ref}: tensor 'model.layers.{layer}.{part}' is missing")
        return kept

    def _check_expert(self, ref: Ref, source: ModelSource) -> None:
        want = {"gate_proj": (self.ffn, self.hidden), "up_proj": (self.ffn, self.hidden),
                "down_proj": (self.hidden, self.ffn)}
        names = set(source.keys())
        for layer in range(self.layers):
            for proj, _ in PROJECTIONS:
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                if name not in names:
                    raise AdaptkitError(f"expert {ref}: tensor '{name}' is missing (fewer layers than the base?)")
                if source.info(name).shape != want[proj]:
                    raise AdaptkitError(f"expert {ref}: '{name}' has shape {source.info(name).shape}, the base's "
                                        f"config needs {want[proj]}")

    def layout(self, gate_code: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype code, shape) of every output tensor; routers in `gate_code` unless a dtype is set."""
        rows = [(n, self._out_code(self.base.info(n).dtype), self.base.info(n).shape) for n in self.kept]
        for layer in range(self.layers):
            rows.append((router_name(layer), self._out_code(gate_code), (len(self.experts), self.hidden)))
            for e, source in enumerate(self.experts):
                for proj, w in PROJECTIONS:
                    info = source.info(f"model.layers.{layer}.mlp.{proj}.weight")
                    rows.append((expert_name(layer, e, w), self._out_code(info.dtype), info.shape))
        return sorted(rows, key=lambda row: _natural(row[0]))

    def mixtral_config(self) -> dict:
        """The base's config.json as a MixtralForCausalLM's, as mergekit writes it (no sliding window)."""
        cfg = {k: v for k, v in self.base_config.items() if k not in _DROPPED}
        cfg.update({k: v for k, v in _MIXTRAL_DEFAULTS.items() if k not in cfg})
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=len(self.experts),
                   num_experts_per_tok=self.config.experts_per_token, sliding_window=None)
        if self.out_dtype is not None:
            cfg["torch_dtype" if "torch_dtype" in self.base_config else "dtype"] = str(self.out_dtype).split(".")[-1]
        return cfg

    def summary(self) -> dict[str, Any]:
        layout = self.layout("BF16" if self.config.gate_mode in HIDDEN_MODES else "F32")
        return {"architecture": "MixtralForCausalLM", "base": str(self.config.base),
                "experts": [str(e.ref) for e in self.config.experts], "gate_mode": self.config.gate_mode,
                "experts_per_token": self.config.experts_per_token, "layers": self.layers, "tensors": len(layout),
                "parameters": sum(math.prod(s) for _, _, s in layout),
                "output_bytes": sum(math.prod(s) * code_to_torch(d).itemsize for _, d, s in layout),
                "dtype": str(self.out_dtype).split(".")[-1] if self.out_dtype is not None else None}


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def expert_name(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def build_moe(config: MoeConfig, out: str | Path, *, force: bool = False, seed: int | None = None,
              dtype: str | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE, device: str = "cpu",
              allow_pickle: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write the Mixtral model `config` describes into the folder `out` (whole or not at all);
    returns a report (the CLI's --json)."""
    import torch

    start = time.perf_counter()
    check_output(out, force=force, inputs=config.inputs())  # before the hidden pass, not after it
    plan = MoePlan(config, allow_pickle=allow_pickle, dtype=dtype)
    generator = torch.Generator()
    seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
    embed = plan.base.get("model.embed_tokens.weight", float32=False) if config.gate_mode == "cheap_embed" else None
    gates = gate_vectors(config.gate_mode, config.experts, layers=plan.layers, hidden=plan.hidden,
                         base_folder=plan.base.root, embed=embed, generator=generator, device=device)
    degenerate = degenerate_layers(gates)
    report = plan.summary()
    with atomic_output(out, force=force, inputs=config.inputs()) as tmp:
        (tmp / "config.json").write_text(readers.dump_json(plan.mixtral_config(), tmp / "config.json"))
        _copy_tokenizer(plan.base.root, tmp)
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
    randomized = config.gate_mode in RANDOM_MODES or any(e.noise_scale is not None for e in config.experts)
    report.update(output=str(out), files=[f.name for f in files], seed=seed if randomized else None,
                  degenerate_layers=degenerate, seconds=round(time.perf_counter() - start, 3))
    return report


def _stream(plan: MoePlan, writer: ShardedWriter, dtypes: dict, gates, generator, bar) -> None:
    """The base's tensors, then per layer each expert's w1, w2, w3 (noise drawn in that order), then the routers."""
    import torch

    def write(name: str, tensor) -> None:
        writer.write(name, tensor.to(dtypes[name]))
        bar.update()

    for name in plan.kept:
        write(name, plan.base.get(name, float32=False))
    for layer in range(plan.layers):
        for e, (expert, source) in enumerate(zip(plan.config.experts, plan.experts)):
            for proj, w in PROJECTIONS:
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                tensor = source.get(name, float32=source.has_deltas(name))
                if expert.noise_scale is not None:
                    noise = torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator)
                    tensor = tensor + noise * expert.noise_scale
                if w == "w2" and expert.residual_scale is not None:
                    tensor = tensor * expert.residual_scale
                write(expert_name(layer, e, w), tensor)
    for layer in range(plan.layers):
        write(router_name(layer), gates[layer].contiguous())


def _copy_tokenizer(source: Path, dest: Path) -> None:
    """The base's tokenizer files (and generation config), as they are."""
    for name in _TOKENIZER_FILES:
        path = source / name
        if path.exists():
            (dest / name).write_bytes(regular_file(inside(path, source), "tokenizer file").read_bytes())


__all__ = ["CONFIG_KEYS", "EXPERT_KEYS", "MoeConfig", "MoePlan", "build_moe", "expert_name", "load_moe_config",
           "router_name"]
