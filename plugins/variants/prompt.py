"""Prompt learning: trained virtual tokens in front of the input, as PEFT's three prompt methods.

- Prompt tuning (Lester et al. 2021, arXiv 2104.08691): n trained embeddings P (n × d) go before the
  input's token embeddings, X' = [P; E(x)]; the attention mask gets n ones in front, labels n × −100,
  so the logits cover n + L positions (as PEFT returns them).
- P-tuning (Liu et al. 2021, arXiv 2103.10385): the same, P computed by a prompt encoder (an MLP or
  LSTM over n trainable embeddings). PEFT saves the encoder's output, so a saved adapter is P itself.
- Prefix tuning (Li & Liang 2021, arXiv 2101.00190): every attention layer ℓ attends to n trained
  keys and values before the input's: a cache K_ℓ, V_ℓ (n × heads × head_dim each), stored as one
  n × (layers·2·token_dim) table (its encoder's output where `prefix_projection` trained one). The
  mask gets n ones in front; positions start at n, as after n cached tokens.

They change the model's call (`rewrite_call`), not its weights: there is no ΔW, so merging and
conversion are refused. Files: PEFT's folder, one tensor `prompt_embeddings`, `task_type` CAUSAL_LM
(PEFT runs prompts only in its task models); others and encoder-decoder models (two transformer
submodules) are refused by name. Cached generation puts the virtual tokens into the cache on its first
call (`_prompt_cache`). Fresh adapters train P (prompt tuning, RANDOM or SAMPLE_VOCAB start) or the
prefix table itself (no projection).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

from ._prompt_cache import continued, continues, pad, prefix_cache

if TYPE_CHECKING:
    import torch

ROLE = "prompt_embeddings"
SHAPE_KEYS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                        "num_layers"})
# PEFT's own prefix layouts: post-processed (bloom, chatglm, gpt_bigcode), per-layer shapes (gemma4). Gemma 2 and 3 are
# not among them: their sliding-window caches keep what a dynamic cache keeps under their masks (equal to PEFT's).
OWN_CACHES = ("bloom", "chatglm", "gemma4", "gpt_bigcode")


class PromptLearning:
    """Virtual tokens before the input (prompt tuning; P-tuning's saved form)."""

    param_names = (ROLE,)
    config_types = {"num_virtual_tokens": v.positive_int, "token_dim": v.optional(v.positive_int),
                    "num_layers": v.optional(v.positive_int), "num_attention_heads": v.optional(v.positive_int),
                    "num_transformer_submodules": v.optional(v.positive_int)}
    inspect_rows = ("virtual_tokens",)

    def __init__(self, name: str, peft_type: str, label: str, keys: frozenset[str], defaults: dict[str, Any]):
        self.name, self.peft_type, self.label = name, peft_type, label
        self.config_keys = SHAPE_KEYS | keys
        self.defaults = {"num_virtual_tokens": 8, **dict.fromkeys(SHAPE_KEYS - {"num_virtual_tokens"}), **defaults}

    # -- tensor plane: no ΔW -----------------------------------------------------------------------
    def not_weights(self) -> str:
        return f"{self.label} is not a weight delta: it cannot be merged or converted (load it with load_adapter)"

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        shape = adapter.store.info(adapter.shared[ROLE]).shape if ROLE in adapter.shared else None
        return {"virtual_tokens": adapter.config.get("num_virtual_tokens"), "shape": shape, "modules": {}}

    def check_files(self, adapter: AdapterFiles) -> None:
        if set(adapter.shared) != {ROLE} or adapter.modules:
            raise AdaptkitError(f"{adapter.store.root}: a {self.name} adapter holds one tensor '{ROLE}'")
        shape, n = adapter.store.info(adapter.shared[ROLE]).shape, adapter.config.get("num_virtual_tokens")
        if len(shape) != 2 or shape[0] != n:
            raise AdaptkitError(f"{adapter.store.root}: {ROLE} has shape {shape}, not num_virtual_tokens={n} rows")

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        raise AdaptkitError(self.not_weights())

    def check_mergeable(self, adapter: AdapterFiles) -> None:
        raise AdaptkitError(f"adapter {adapter.store.root}: {self.not_weights()}")

    # -- module plane --------------------------------------------------------------------------------
    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """The adapter sits on the input embedding (it holds P there); the model's shapes fill the config."""
        if config["target_modules"] is not None:
            raise AdaptkitError(f"{self.name} adds virtual tokens to the model's input; it takes no target_modules")
        if (config["num_transformer_submodules"] or 1) != 1:
            raise AdaptkitError(f"{self.name} on encoder-decoder models (num_transformer_submodules=2) is not "
                                "supported")
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found = [p for p, m in model.named_modules() if p and m is embedding]
        if not found:
            raise AdaptkitError(f"{self.name}: the model has no input embedding (get_input_embeddings)")
        shapes = self.model_shapes(getattr(model, "config", None), embedding)
        for key, value in shapes.items():
            if config[key] is not None and config[key] != value:
                raise AdaptkitError(f"{self.name} adapter has {key}={config[key]} but this model has {value}; "
                                    "is it for a different base model?")
        device = next((p.device for p in model.parameters()), None)
        return {**config, **shapes, "num_transformer_submodules": 1, "target_modules": found[:1], "device": device}

    def model_shapes(self, model_config, embedding) -> dict[str, Any]:
        return {"token_dim": int(embedding.weight.shape[1])}

    def width(self, config: dict[str, Any]) -> int:
        return config["token_dim"]

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind != "embedding":
            raise AdaptkitError(f"{path}: {self.name} holds its virtual tokens at the input embedding")
        return {"shape": (config["num_virtual_tokens"], self.width(config)), "device": config.get("device"),
                "init": config.get("prompt_tuning_init", "RANDOM"), "saved_form": config.get("inference_mode", False)}

    def create(self, target, settings, weight, shared):
        from torch import nn

        # A loaded adapter (PEFT's inference mode) gets P from its file: no start, no encoder to train.
        table = PromptLearning.start(self, settings, weight) if settings["saved_form"] else self.start(settings, weight)
        shared[ROLE] = nn.Parameter(table.to(settings["device"]) if settings["device"] is not None else table)
        return nn.ParameterDict({ROLE: shared[ROLE]})

    def start(self, settings, weight) -> torch.Tensor:
        import torch

        return torch.randn(settings["shape"])  # as nn.Embedding starts

    def forward(self, branch, base_layer, x, result):
        return result  # the tokens join in `rewrite_call`; the embedding itself is unchanged

    def rewrite_call(self, model, tensors, config: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """X' = [P; E(x)]: inputs_embeds with P in front, mask and labels padded; positions dropped (as PEFT)."""
        import torch

        if continues(self.name, config["num_virtual_tokens"], kwargs):
            return continued(kwargs, config["num_virtual_tokens"], shift=False)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        prompts = tensors[ROLE].to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        dropped = {k: None for k in ("input_ids", "position_ids", "token_type_ids") if k in kwargs}
        return {**pad(kwargs, prompts.shape[1]), **dropped, "inputs_embeds": torch.cat([prompts, embeds], dim=1)}

    def stored_key(self, role: str, target) -> str:
        return role

    def save_tensors(self, branch) -> dict[str, torch.Tensor]:
        return {}  # P is the adapter's shared tensor, written once at the top level

    def file_config(self, config: dict[str, Any], settings: dict[str, Any], transposed: bool) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **{k: config[k] for k in sorted(self.config_keys) if k in config},
                "task_type": "CAUSAL_LM"}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        task = adapter.config.get("task_type")
        if task != "CAUSAL_LM":
            raise AdaptkitError(f"{adapter.store.root}: {self.name} runs on causal language models (task_type "
                                f"CAUSAL_LM); this adapter's task_type is {task!r}")
        return {k: adapter.config[k] for k in (set(self.defaults) & set(adapter.config))}


class PromptTuning(PromptLearning):
    """Prompt tuning: X' = [P; E(x)] (arXiv 2104.08691)."""

    config_types = {**PromptLearning.config_types, "prompt_tuning_init": v.choice("RANDOM", "SAMPLE_VOCAB", "TEXT")}

    def start(self, settings, weight) -> torch.Tensor:
        """RANDOM: N(0, 1); SAMPLE_VOCAB: embeddings of random vocabulary rows; TEXT needs a tokenizer."""
        import torch

        if settings["init"] == "SAMPLE_VOCAB":
            rows = weight.T  # math layout d × vocab
            return rows[torch.randint(rows.shape[0], (settings["shape"][0],))].detach().float().clone()
        if settings["init"] == "TEXT":
            raise AdaptkitError("prompt_tuning_init TEXT needs the tokenizer to embed the text; start from RANDOM or "
                                "SAMPLE_VOCAB, or load an adapter PEFT initialized from text")
        return super().start(settings, weight)


class PTuning(PromptLearning):
    """P-tuning: X' = [P; E(x)], P a prompt encoder's output, as saved (arXiv 2103.10385)."""

    def start(self, settings, weight) -> torch.Tensor:
        raise AdaptkitError("training P-tuning's prompt encoder (MLP/LSTM) is not supported: load a saved P-tuning "
                            "adapter, or train its output P directly (inference_mode=True, PEFT's saved form)")


class PrefixTuning(PromptLearning):
    """Prefix tuning: n keys and values before the input's at every attention layer (arXiv 2101.00190)."""

    config_types = {**PromptLearning.config_types, "init_weights": v.optional(v.choice("zero"))}

    def model_shapes(self, model_config, embedding) -> dict[str, Any]:
        """PEFT's: key/value heads (grouped-query models have fewer) × head size, per layer."""
        if model_config is None:
            raise AdaptkitError("prefix tuning needs the model's config (layers, attention heads)")
        if model_config.model_type in OWN_CACHES:
            raise AdaptkitError(f"prefix tuning on {model_config.model_type} models (their own cache layout) is not "
                                "supported")
        heads = model_config.num_attention_heads
        kv = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        return {"num_layers": model_config.num_hidden_layers, "num_attention_heads": kv, "token_dim": kv * head_dim}

    def width(self, config: dict[str, Any]) -> int:
        return config["num_layers"] * 2 * config["token_dim"]

    def start(self, settings, weight) -> torch.Tensor:
        if settings["projection"]:
            raise AdaptkitError("training prefix tuning's projection (prefix_projection) is not supported: load a "
                                "saved adapter, or train without it")
        table = super().start(settings, weight)
        return table.zero_() if settings["init"] == "zero" else table  # "zero": PEFT's no-op start

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        return {**super().settings(config, path, target), "projection": bool(config["prefix_projection"]),
                "init": config["init_weights"]}

    def rewrite_call(self, model, tensors, config: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The cache: the table as (batch, n, layers·2, heads, head_dim), per layer (K, V) of (batch, heads, n,
        head_dim), as PEFT's get_prompt; mask padded, positions shifted by n."""
        if continues(self.name, config["num_virtual_tokens"], kwargs):
            return continued(kwargs, config["num_virtual_tokens"], shift=True)
        given = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        table, n = tensors[ROLE], config["num_virtual_tokens"]
        dtype = model.get_input_embeddings().weight.dtype
        layers, heads, dim = config["num_layers"], config["num_attention_heads"], config["token_dim"]
        kv = table.to(dtype).unsqueeze(0).expand(given.shape[0], -1, -1)
        kv = kv.reshape(given.shape[0], n, layers * 2, heads, dim // heads).permute(2, 0, 3, 1, 4).split(2)
        kwargs = continued(kwargs, n, shift=True)  # as a later call: the logits cover the input alone
        return {**kwargs, "past_key_values": prefix_cache(kwargs, list(kv))}


# inference_mode (PEFT's): the adapter is in its saved form, P itself, with no encoder to train (a loaded file).
_COMMON = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
           "tokenizer_kwargs": None}
PROMPT_TUNING = PromptTuning("prompt_tuning", "PROMPT_TUNING", "prompt tuning", frozenset(_COMMON),
                             {**_COMMON, "inference_mode": False})
_ENCODER = {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": None, "encoder_num_layers": 2,
            "encoder_dropout": 0.0}
P_TUNING = PTuning("p_tuning", "P_TUNING", "P-tuning", frozenset(_ENCODER), {**_ENCODER, "inference_mode": False})
_PREFIX = {"encoder_hidden_size": None, "prefix_projection": False, "init_weights": None}
PREFIX_TUNING = PrefixTuning("prefix_tuning", "PREFIX_TUNING", "prefix tuning", frozenset(_PREFIX),
                             {**_PREFIX, "inference_mode": False})
