"""mergekit-moe's output architectures: where `adaptkit moe` puts each tensor of the mixture and what
its config.json says (`moe` reads the config, computes the gates and streams the tensors).

Every output keeps the base model's embeddings, norms and attention and gives each layer one expert
per `experts` entry (that model's MLP of the same layer) behind a router W (experts × hidden):

| output (`architecture:`) | written as | inputs | shared experts | a layer's experts |
|---|---|---|---|---|
| Mixtral | MixtralForCausalLM | llama, mistral | none | `block_sparse_moe.experts.E.w1/w2/w3` |
| DeepSeek MoE | DeepseekForCausalLM | llama, mistral | 0 or 1, no prompts | `mlp.experts.E.*`, `mlp.shared_experts.*` |
| Qwen MoE | Qwen2MoeForCausalLM | llama, mistral, qwen2 | 1, prompts | `mlp.experts.E.*`, `mlp.shared_expert.*` |
| Qwen3 MoE | Qwen3MoeForCausalLM | qwen3 | none | `mlp.experts.E.*_proj` |

A shared expert runs on every token beside the routed ones. Qwen2-MoE scales its output by σ(g·x),
g (1 × hidden, `shared_expert_gate`) computed from the shared expert's prompts as a router row is
(random for `gate_mode: random`); DeepSeek adds it ungated, so its shared expert takes no prompts.
Qwen2-MoE has q/k/v biases: zeros where the inputs (Llama, Mistral) have none, sized by the
projections (mergekit sizes them hidden/heads per head, wrong where a config sets `head_dim`).
DeepSeek's model is not in transformers: its config names DeepSeek's own code (`auto_map`, as
mergekit writes it), which loads only with `trust_remote_code`; adaptkit never runs it.

The output is chosen as mergekit-moe chooses it: among the outputs whose name starts with
`architecture` (every one without it) that take the config, Mixtral if it does, else the first in the
table's order. Expert tensors are written one per expert (the layout transformers 4 and 5 read)
where mergekit 0.1.5 writes transformers 5's fused ones for Mixtral and Qwen3. Expert noise is drawn
in mergekit's order for each output (`Output.order`), so a seed gives mergekit's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: Keys of the base's config.json that do not describe the output.
DROPPED = ("architectures", "model_type", "torch_dtype", "dtype", "auto_map", "_name_or_path", "quantization_config",
           "transformers_version")
#: The attention and norms of a Llama layer, which every output keeps from the base.
ATTENTION = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
             "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
SAME = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
#: DeepSeek's code, as mergekit's config names it.
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base--"
_DEEPSEEK_MAP = {"AutoConfig": "configuration_deepseek.DeepseekConfig", "AutoModel": "modeling_deepseek.DeepseekModel",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}


@dataclass(frozen=True)
class Output:
    name: str  # mergekit's, which `architecture:` matches by prefix
    architecture: str
    sources: tuple[str, ...]  # the input model types it takes
    shared: tuple[int, int]  # fewest and most shared experts
    router: str  # names, formatted with layer (and expert, proj)
    expert: str
    settings: Callable[[dict, int, int, int], dict]  # (base config, experts, shared, per token) -> its keys
    #: source projections in the order mergekit draws their noise: per layer, projection by projection
    #: over the experts and then the shared one (`by_projection`), or expert by expert
    order: tuple[str, ...] = ("gate_proj", "down_proj", "up_proj")
    by_projection: bool = False
    projections: dict[str, str] = field(default_factory=lambda: SAME)  # source projection -> output's
    shared_expert: str | None = None  # formatted with layer and proj
    shared_gate: str | None = None  # formatted with layer: a gate row per shared expert, from its prompts
    zeros: tuple[str, ...] = ()  # layer tensors it needs that Llama lacks: zeros, sized by their weights

    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        return self.expert.format(layer=layer, expert=expert, proj=self.projections[proj])

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def refusal(self, model_type: str, shared: list, gate_mode: str) -> str | None:
        """Why this output does not take the config (None: it does), as mergekit's `supports_config`."""
        if model_type not in self.sources:
            return f"takes {' or '.join(self.sources)} models, not {model_type}"
        low, high = self.shared
        if not low <= len(shared) <= high:
            return ("takes no shared experts" if high == 0 else f"takes exactly {low} shared expert" if low == high
                    else f"takes at most {high} shared expert")
        if shared and self.shared_gate is None and any(e.positive or e.negative for e in shared):
            return "adds its shared expert ungated, so it takes no prompts for it"
        if shared and self.shared_gate is not None and gate_mode != "random" and not shared[0].positive:
            return f"gates its shared expert, which needs positive_prompts with gate_mode {gate_mode}"
        return None

    def config(self, base: dict, experts: int, shared: int, per_token: int, dtype: str | None) -> dict[str, Any]:
        """The base's config.json as this output's (mergekit's keys and values)."""
        cfg = {k: v for k, v in base.items() if k not in DROPPED}
        cfg.update(self.settings(cfg, experts, shared, per_token))
        if dtype is not None:
            cfg["torch_dtype" if "torch_dtype" in base else "dtype"] = dtype
        return cfg


def _mixtral(cfg: dict, experts: int, shared: int, per_token: int) -> dict:
    defaults = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}
    return {**{k: v for k, v in defaults.items() if k not in cfg}, "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": per_token,
            "sliding_window": None}


def _deepseek(cfg: dict, experts: int, shared: int, per_token: int) -> dict:
    return {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "n_routed_experts": experts,
            "n_shared_experts": shared or None, "num_experts_per_tok": per_token, "first_k_dense_replace": 0,
            "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
            "moe_intermediate_size": cfg["intermediate_size"],
            "auto_map": {k: DEEPSEEK_CODE + v for k, v in _DEEPSEEK_MAP.items()}}


def _qwen(cfg: dict, experts: int, shared: int, per_token: int) -> dict:
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": experts,
            "num_experts_per_tok": per_token, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "sliding_window": None, "use_sliding_window": False, "qkv_bias": True,
            "shared_expert_intermediate_size": cfg["intermediate_size"],
            "moe_intermediate_size": cfg["intermediate_size"]}


def _qwen3(cfg: dict, experts: int, shared: int, per_token: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": experts,
            "num_experts_per_tok": per_token, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "moe_intermediate_size": cfg["intermediate_size"]}


_LAYER = "model.layers.{layer}."
MIXTRAL = Output("Mixtral", "MixtralForCausalLM", ("llama", "mistral"), (0, 0),
                 _LAYER + "block_sparse_moe.gate.weight", _LAYER + "block_sparse_moe.experts.{expert}.{proj}.weight",
                 _mixtral, projections={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"})
#: In mergekit's order of preference after Mixtral.
OUTPUTS = (
    MIXTRAL,
    Output("DeepSeek MoE", "DeepseekForCausalLM", ("llama", "mistral"), (0, 1), _LAYER + "mlp.gate.weight",
           _LAYER + "mlp.experts.{expert}.{proj}.weight", _deepseek, order=("up_proj", "gate_proj", "down_proj"),
           by_projection=True, shared_expert=_LAYER + "mlp.shared_experts.{proj}.weight"),
    Output("Qwen MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), (1, 1), _LAYER + "mlp.gate.weight",
           _LAYER + "mlp.experts.{expert}.{proj}.weight", _qwen, order=("down_proj", "gate_proj", "up_proj"),
           by_projection=True, shared_expert=_LAYER + "mlp.shared_expert.{proj}.weight",
           shared_gate=_LAYER + "mlp.shared_expert_gate.weight",
           zeros=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    Output("Qwen3 MoE", "Qwen3MoeForCausalLM", ("qwen3",), (0, 0), _LAYER + "mlp.gate.weight",
           _LAYER + "mlp.experts.{expert}.{proj}.weight", _qwen3, order=("gate_proj", "up_proj", "down_proj")),
)
#: Every input model type some output takes.
SOURCE_TYPES = tuple(dict.fromkeys(t for o in OUTPUTS for t in o.sources))
#: Per-layer tensors an output keeps from the base besides ATTENTION (Qwen2 and Qwen3 inputs have them).
EXTRA_ATTENTION = {"qwen2": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                   "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight")}


def named(architecture: str | None) -> list[Output]:
    """The outputs an `architecture:` value names (mergekit: a case-blind prefix of the name)."""
    if not architecture:
        return list(OUTPUTS)
    return [o for o in OUTPUTS if o.name.lower().startswith(architecture.lower())]


__all__ = ["ATTENTION", "EXTRA_ATTENTION", "MIXTRAL", "OUTPUTS", "Output", "SOURCE_TYPES", "named"]
