"""PEFT's own test matrix as data: the small models of its `tests/test_custom_models.py` (shapes copied,
code ours), its TEST_CASES table, the configs of `tests/test_decoder_models.py`, and tiny decoder
models of the six families that file runs (built from configs, no download).

The case rows are PEFT's (huggingface/peft, Apache-2.0), kept verbatim so the matrix can be compared
with PEFT's; a config object nested in a row (`KasaConfig()`, ...) is written `Nested("KasaConfig",
...)` and built from the installed PEFT when the case runs. `benchmarks/peft_matrix.py` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

INPUT = torch.arange(90).view(9, 10)  # PEFT's prepare_inputs_for_testing for the custom models
IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0))  # decoder inputs ...
IDS[:, 4] = 1  # ... with token 1 in the middle: the aLoRA case's invocation token (it acts from there on)


@dataclass(frozen=True)
class Nested:
    """A config object inside a case's kwargs, built from the installed PEFT by name."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, cls: str, **kwargs):
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "kwargs", kwargs)


class _Net(nn.Module):
    """A stack run in order on the float (or, with an embedding first, integer) input."""

    def __init__(self, layers: list[tuple[str, nn.Module]], reshape: tuple[int, ...] | None = None, repeat: int = 1):
        super().__init__()
        for name, module in layers:
            self.add_module(name, module)
        self.order, self.reshape, self.repeat = [n for n, _ in layers], reshape, repeat
        self.token_ids = isinstance(layers[0][1], nn.Embedding)  # decided here: an adapter wraps the layer

    def forward(self, x):
        if not self.token_ids:
            x = x.float()
        if self.reshape:
            x = x.reshape(*self.reshape)
        if self.repeat > 1:
            x = torch.cat([x] * self.repeat, dim=1)
        for name in self.order:
            x = getattr(self, name)(x)
        return x


def mlp(hidden: int = 20, layernorm: bool = False) -> nn.Module:
    norm0 = [("layernorm0", nn.LayerNorm(10, 10))] if layernorm else []
    norm1 = [("layernorm1", nn.LayerNorm(hidden, hidden))] if layernorm else []
    return _Net([*norm0, ("lin0", nn.Linear(10, hidden)), ("relu", nn.ReLU()), ("drop", nn.Dropout(0.5)), *norm1,
                 ("lin1", nn.Linear(hidden, 2)), ("sm", nn.LogSoftmax(dim=-1))])


def emb_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return _Net([("emb", nn.Embedding(100, 5)), ("conv1d", Conv1D(1, 5)), ("relu", nn.ReLU()),
                 ("flat", nn.Flatten()), ("lin0", nn.Linear(10, 2)), ("sm", nn.LogSoftmax(dim=-1))])


def conv(name: str, module: nn.Module, features: int, reshape, repeat: int = 1, head: bool = True) -> nn.Module:
    tail = [("sm", nn.LogSoftmax(dim=-1))] if head else []
    return _Net([(name, module), ("relu", nn.ReLU()), ("flat", nn.Flatten()), ("lin0", nn.Linear(features, 2)),
                 *tail], reshape=reshape, repeat=repeat)


class Conv2dAfterLinear(nn.Module):
    """lin0 -> Conv2d -> lin1: PEFT's ModelConv2D2 (in=8, reshape to 3×3) and ModelConv2DGroups
    (the whole batch flattened into one sample of 90 features, groups=8)."""

    def __init__(self, lin_in: int, lin_out: int, conv2d: nn.Conv2d, shape: tuple[int, ...], flatten_all: bool):
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(lin_in, lin_out), conv2d, nn.Linear(conv2d.out_channels, 2)
        self.shape, self.flatten_all = shape, flatten_all

    def forward(self, x):
        x = x.float()
        x = self.lin0(x.flatten() if self.flatten_all else x)
        if not self.flatten_all:
            x = torch.relu(x)
        x = torch.relu(self.conv2d(x.reshape(*self.shape))).flatten(1)
        return torch.log_softmax(self.lin1(x), dim=-1)


class Conv2dGroups2(nn.Module):
    """PEFT's ModelConv2DGroups2: a fixed 9×16×20×20 input (the given one is ignored), groups=2."""

    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(12800, 2)

    def forward(self, x):
        x = torch.arange(9 * 16 * 20 * 20, dtype=torch.float).view(9, 16, 20, 20) / 1e4  # PEFT: unscaled
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x)).flatten(1)), dim=-1)


class Conv3d(nn.Module):
    """PEFT's ModelConv3D: a 2-D input stacked three times into a 5×3×3×3 volume."""

    def __init__(self):
        super().__init__()
        self.conv3d, self.lin0 = nn.Conv3d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, x):
        x = torch.stack([x.float()] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        return torch.log_softmax(self.lin0(torch.relu(self.conv3d(x)).flatten(1)), dim=-1)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        x = x.float()
        return torch.log_softmax(self.lin0(self.mha(x, x, x)[0]), dim=-1)


class LinearUsingParameter(nn.Module):
    """A linear layer kept as a bare in × out parameter (what `target_parameters` is for)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


def mlp_using_parameters() -> nn.Module:
    return _Net([("lin0", LinearUsingParameter(10, 20)), ("relu", nn.ReLU()), ("drop", nn.Dropout(0.5)),
                 ("lin1", LinearUsingParameter(20, 2)), ("sm", nn.LogSoftmax(dim=-1))])


MODELS = {  # PEFT's model ids -> builders (same layer names and shapes as PEFT's classes)
    "MLP": mlp,
    "MLP2": lambda: mlp(hidden=32),
    "MLP_LayerNorm": lambda: mlp(layernorm=True),
    "EmbConv1D": emb_conv1d,
    "Conv1d": lambda: conv("conv1d", nn.Conv1d(1, 1, 2), 9, (-1, 1, 10)),
    "Conv1dBigger": lambda: conv("conv1d", nn.Conv1d(64, 16, 2), 144, (-1, 1, 10), repeat=64),
    "Conv1dGroups": lambda: conv("conv1d", nn.Conv1d(8, 8, 3, groups=2), 64, (-1, 1, 10), repeat=8),
    "Conv1dKernel1": lambda: conv("conv1d", nn.Conv1d(3, 10, 1), 100, (-1, 3, 10), head=False),
    "Conv2d": lambda: conv("conv2d", nn.Conv2d(5, 10, 3), 10, (-1, 5, 3, 3)),
    "Conv2d1x1": lambda: conv("conv2d", nn.Conv2d(1, 10, kernel_size=(1, 1)), 90, (-1, 1, 3, 3)),
    "Conv2d2": lambda: Conv2dAfterLinear(10, 40, nn.Conv2d(8, 32, 3), (-1, 8, 3, 3), flatten_all=False),
    "Conv2dGroups": lambda: Conv2dAfterLinear(90, 288, nn.Conv2d(16, 16, 3, groups=8), (2, 16, 3, 3),
                                              flatten_all=True),
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": Conv3d,
    "MHA": Mha,
    "MlpUsingParameters": mlp_using_parameters,
}


def custom_model(model_id: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_id]().eval()


# -- tiny decoders of the six families PEFT's decoder tests run -------------------------------------

DECODERS = {  # family -> (transformers config class, model class, config fields)
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                                   eos_token_id=2)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             num_key_value_heads=2, head_dim=8)),
}


def decoder(family: str, seed: int = 0) -> nn.Module:
    import transformers

    config_cls, model_cls, fields = DECODERS[family]
    config = getattr(transformers, config_cls)(vocab_size=128, max_position_embeddings=64, **fields)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


# -- the cases ------------------------------------------------------------------------------------

# tests/test_decoder_models.py ALL_CONFIGS: (config class, kwargs), run on every family in DECODERS.
DECODER_CONFIGS = [
    ("AdaLoraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "total_step": 1}),
    ("BeftConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("BOFTConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("MissConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "r": 2}),
    ("CPTConfig", {"task_type": "CAUSAL_LM", "cpt_token_ids": [0, 1, 2, 3, 4, 5, 6, 7], "cpt_mask": [1] * 8,
                   "cpt_tokens_type_mask": [1, 2, 2, 2, 3, 3, 4, 4]}),
    ("DeftConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("DeloraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "r": 2}),
    ("FourierFTConfig", {"task_type": "CAUSAL_LM", "n_frequency": 10, "target_modules": None}),
    ("FrodConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "sparse_rate": 0.01}),
    ("GraloraConfig", {"task_type": "CAUSAL_LM", "r": 8, "alpha": 16, "target_modules": None, "gralora_dropout": 0.05,
                       "gralora_k": 2, "hybrid_r": 0}),
    ("GraloraConfig", {"task_type": "CAUSAL_LM", "r": 16, "alpha": 32, "target_modules": None,
                       "gralora_dropout": 0.05, "gralora_k": 4, "hybrid_r": 4}),
    ("GloraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "init_weights": True}),
    ("GloraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "init_weights": False}),
    ("HiraConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("HRAConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("IA3Config", {"task_type": "CAUSAL_LM", "target_modules": None, "feedforward_modules": None}),
    ("LoraConfig", {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                    "bias": "none"}),
    ("LoraConfig", {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                    "bias": "none", "alora_invocation_tokens": [1]}),
    ("LoraConfig", {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                    "bias": "none", "alora_invocation_tokens": [1000]}),
    ("LoraConfig", {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05,
                    "bias": "none", "trainable_token_indices": [0, 1, 3]}),
    ("OFTConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("PrefixTuningConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 10}),
    ("PrefixTuningConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 10, "init_weights": "zero"}),
    ("PromptEncoderConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 10, "encoder_hidden_size": 32}),
    ("PromptTuningConfig", {"task_type": "CAUSAL_LM", "num_virtual_tokens": 10}),
    ("RandLoraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "r": 8, "randlora_alpha": 1}),
    ("RoadConfig", {"task_type": "CAUSAL_LM", "variant": "road_1", "group_size": 2}),
    ("ShiraConfig", {"r": 1, "task_type": "CAUSAL_LM", "target_modules": None, "init_weights": False}),
    ("SupertuningConfig", {"sparsity": 0.9, "task_type": "CAUSAL_LM", "target_modules": None, "init_weights": False}),
    ("SupertuningConfig", {"sparsity": 0.9, "r": 2, "select_top": False, "task_type": "CAUSAL_LM",
                           "target_modules": None, "init_weights": False}),
    ("VBLoRAConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "vblora_dropout": 0.05, "vector_length": 1,
                      "num_vectors": 2}),
    ("VeraConfig", {"task_type": "CAUSAL_LM", "r": 8, "target_modules": None, "vera_dropout": 0.05,
                    "projection_prng_key": 0xFF, "d_initial": 0.1, "save_projection": True, "bias": "none"}),
    ("UniLoraConfig", {"task_type": "CAUSAL_LM", "target_modules": None, "theta_d_length": 257}),
    ("TinyLoraConfig", {"task_type": "CAUSAL_LM", "target_modules": None}),
    ("PveraConfig", {"r": 8, "pvera_dropout": 0.05, "task_type": "CAUSAL_LM"}),
    ("C3AConfig", {"task_type": "CAUSAL_LM", "block_size": 1, "target_modules": None}),
    ("WaveFTConfig", {"task_type": "CAUSAL_LM", "n_frequency": 8, "target_modules": None}),
    ("OSFConfig", {"task_type": "CAUSAL_LM"}),
    ("PsoftConfig", {"task_type": "CAUSAL_LM", "r": 4, "psoft_alpha": 4}),
]

# tests/test_custom_models.py TEST_CASES: (name, model id, config class, kwargs).
CUSTOM_CASES = [
    ('Vanilla MLP 1 GLoRA', 'MLP', 'GloraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 GLoRA', 'MLP', 'GloraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 GLoRA', 'MLP', 'GloraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 GLoRA', 'MLP', 'GloraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 GLoRA', 'MLP', 'GloraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 GLoRA', 'MLP', 'GloraConfig', {'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 1 LoRA', 'MLP', 'LoraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'lora_alpha': 4, 'lora_dropout': 0.1}),
    ('Vanilla MLP 7 LoRA with DoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'use_dora': True}),
    ('Vanilla MLP 8 LoRA with DoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0', 'lin1'], 'use_dora': True}),
    ('Vanilla MLP 1 LoRA with KaSA', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'kasa_config': Nested('KasaConfig'), 'r': 4}),
    ('Vanilla MLP 1 LoRA with MiCA', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'init_lora_weights': 'mica', 'r': 4}),
    ('Vanilla MLP 9 LoRA with DoRA', 'MLP', 'LoraConfig', 
     {'target_modules': 'lin1', 'use_dora': True, 'lora_alpha': 32}),
    ('Vanilla MLP 10 LoRA with VeLoRA random', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'velora_config': Nested('VeloraConfig', num_groups=2, init_type='random')}),
    ('Vanilla MLP 11 LoRA with VeLoRA batch_average', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'velora_config': Nested('VeloraConfig', num_groups=2, init_type='batch_average')}),
    ('Vanilla MLP 12 LoRA with VeLoRA batch_average_once', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'velora_config': Nested('VeloraConfig', num_groups=2, init_type='batch_average_once')}),
    ('Embedding + transformers Conv1D 1 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['conv1d']}),
    ('Embedding + transformers Conv1D 2 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb']}),
    ('Embedding + transformers Conv1D 3 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb', 'conv1d']}),
    ('Embedding + transformers Conv1D 1 DoRA', 'EmbConv1D', 'LoraConfig', 
     {'target_modules': ['conv1d'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 2 DoRA', 'EmbConv1D', 'LoraConfig', 
     {'target_modules': ['emb'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 3 DoRA', 'EmbConv1D', 'LoraConfig', 
     {'target_modules': ['emb', 'conv1d'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 1 LoRA trainable_tokens', 'EmbConv1D', 'LoraConfig', 
     {'target_modules': ['conv1d'], 'trainable_token_indices': {'emb': [0, 10]}}),
    ('Conv1d LoRA', 'Conv1d', 'LoraConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LoRA with DoRA', 'Conv1d', 'LoraConfig', {'target_modules': ['conv1d'], 'use_dora': True}),
    ('Conv2d 1 LoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 1 LoRA with DoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv2d 2 LoRA with DoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d', 'lin0'], 'use_dora': True}),
    ('Conv2d Groups LoRA', 'Conv2dGroups', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LoRA', 'Conv2dGroups2', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups LoRA with DoRA', 'Conv2dGroups', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv2d Groups2 LoRA with DoRA', 'Conv2dGroups2', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv3d 1 LoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d']}),
    ('Conv3d 2 LoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d', 'lin0']}),
    ('Conv3d 1 LoRA with DoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d'], 'use_dora': True}),
    ('Conv3d 2 LoRA with DoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d', 'lin0'], 'use_dora': True}),
    ('Vanilla MLP 1 LoRA with lora_b bias', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'lora_bias': True, 'lora_alpha': 32}),
    ('Conv2d 1 LoRA with lora_b bias', 'Conv2d', 'LoraConfig', 
     {'target_modules': ['conv2d'], 'lora_bias': True, 'lora_alpha': 32}),
    ('Conv3d 1 LoRA with lora_b bias', 'Conv3d', 'LoraConfig', 
     {'target_modules': ['conv3d'], 'lora_bias': True, 'lora_alpha': 32}),
    ('MHA 1 LoRA', 'MHA', 'LoraConfig', {'target_modules': ['mha']}),
    ('MHA 2 LoRA', 'MHA', 'LoraConfig', {'target_modules': ['mha', 'lin0']}),
    ('MLP 1 using nn.Parameter LoRA', 'MlpUsingParameters', 'LoraConfig', {'target_parameters': ['lin0.weight']}),
    ('MLP 2 using nn.Parameter LoRA', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'target_parameters': ['lin1.weight']}),
    ('Vanilla MLP 1 LoRA with Monteclora', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0'], 'monteclora_config': Nested('MontecloraConfig', num_samples=2)}),
    ('Vanilla MLP 1 IA3', 'MLP', 'IA3Config', {'target_modules': 'lin0', 'feedforward_modules': []}),
    ('Vanilla MLP 2 IA3', 'MLP', 'IA3Config', {'target_modules': 'lin0', 'feedforward_modules': 'lin0'}),
    ('Vanilla MLP 3 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0'], 'feedforward_modules': []}),
    ('Vanilla MLP 4 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0'], 'feedforward_modules': ['lin0']}),
    ('Vanilla MLP 5 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin1'], 'feedforward_modules': []}),
    ('Vanilla MLP 6 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin1'], 'feedforward_modules': ['lin1']}),
    ('Vanilla MLP 7 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0', 'lin1'], 'feedforward_modules': []}),
    ('Vanilla MLP 8 IA3', 'MLP', 'IA3Config', 
     {'target_modules': ['lin0', 'lin1'], 'feedforward_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 9 IA3', 'MLP', 'IA3Config', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'feedforward_modules': ['lin0']}),
    ('transformers Conv1D 1 IA3', 'EmbConv1D', 'IA3Config', 
     {'target_modules': ['conv1d'], 'feedforward_modules': ['conv1d']}),
    ('transformers Conv1D 2 IA3', 'EmbConv1D', 'IA3Config', 
     {'target_modules': ['conv1d', 'lin0'], 'feedforward_modules': ['conv1d', 'lin0']}),
    ('transformers Conv1D 1 IA3', 'EmbConv1D', 'IA3Config', 
     {'target_modules': ['conv1d'], 'feedforward_modules': ['conv1d'], 'modules_to_save': ['lin0']}),
    ('Conv2d 1 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d'], 'feedforward_modules': []}),
    ('Conv2d 2 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d'], 'feedforward_modules': ['conv2d']}),
    ('Conv2d 3 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': []}),
    ('Conv2d 4 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': ['conv2d']}),
    ('Conv2d 5 IA3', 'Conv2d', 'IA3Config', 
     {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': ['conv2d', 'lin0']}),
    ('Conv3d 1 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d'], 'feedforward_modules': []}),
    ('Conv3d 2 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d'], 'feedforward_modules': ['conv3d']}),
    ('Conv3d 3 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': []}),
    ('Conv3d 4 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': ['conv3d']}),
    ('Conv3d 5 IA3', 'Conv3d', 'IA3Config', 
     {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': ['conv3d', 'lin0']}),
    ('Vanilla MLP 1 BEFT', 'MLP', 'BeftConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 BEFT', 'MLP', 'BeftConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 BEFT', 'MLP', 'BeftConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 BEFT', 'MLP', 'BeftConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 BEFT', 'MLP', 'BeftConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 1 LOHA', 'MLP', 'LoHaConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0'], 'alpha': 4, 'module_dropout': 0.1}),
    ('Vanilla MLP 7 LOHA', 'MLP', 'LoHaConfig', {'target_modules': 'lin0', 'rank_dropout': 0.5}),
    ('Conv2d 1 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 3 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d'], 'use_effective_conv2d': True}),
    ('Conv2d 4 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True}),
    ('Conv1d LOHA', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOHA 1', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOHA 2', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 2}),
    ('Conv1d Groups LOHA', 'Conv1dGroups', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 4}),
    ('Conv1d LOHA 3', 'Conv1dBigger', 'LoHaConfig', 
     {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': True}),
    ('Conv1d LOHA 4', 'Conv1dBigger', 'LoHaConfig', 
     {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': False}),
    ('Conv2d 1x1 LOHA', 'Conv2d1x1', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups LOHA', 'Conv2dGroups', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LOHA', 'Conv2dGroups2', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Vanilla MLP 1 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0'], 'alpha': 4, 'module_dropout': 0.1}),
    ('Vanilla MLP 7 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0', 'rank_dropout': 0.5}),
    ('Vanilla MLP 8 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0', 'decompose_both': True, 'r': 1, 'alpha': 1}),
    ('Conv1d LOKR 1', 'Conv1d', 'LoKrConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOKR 2', 'Conv1d', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 2}),
    ('Conv1d Groups LOKR', 'Conv1dGroups', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 4}),
    ('Conv1d LOKR 3', 'Conv1dBigger', 'LoKrConfig', 
     {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': True}),
    ('Conv1d LOKR 4', 'Conv1dBigger', 'LoKrConfig', 
     {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': False}),
    ('Conv2d 1 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 3 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d'], 'use_effective_conv2d': True}),
    ('Conv2d 4 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True}),
    ('Conv2d 1x1 LOKR', 'Conv2d1x1', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 5 LOKR', 'Conv2d', 'LoKrConfig', 
     {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_both': True}),
    ('Conv2d 6 LOKR', 'Conv2d', 'LoKrConfig', 
     {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_factor': 4}),
    ('Conv2d 7 LOKR', 'Conv2d', 'LoKrConfig', 
     {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_both': True, 'decompose_factor': 4}),
    ('Conv2d Groups LOKR', 'Conv2dGroups', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LOKR', 'Conv2dGroups2', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Vanilla MLP 1 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': 'lin0', 'use_cayley_neumann': False}),
    ('Vanilla MLP 2 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 5 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 6 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'module_dropout': 0.1, 'use_cayley_neumann': False}),
    ('Vanilla MLP 7 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01}),
    ('Vanilla MLP 8 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'block_share': True, 'use_cayley_neumann': False}),
    ('Vanilla MLP 9 OFT', 'MLP', 'OFTConfig', 
     {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True}),
    ('Vanilla MLP 10 OFT', 'MLP', 'OFTConfig', 
     {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'use_cayley_neumann': True}),
    ('Vanilla MLP 11 OFT', 'MLP', 'OFTConfig', 
     {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 12 OFT', 'MLP', 'OFTConfig', 
     {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True, 'use_cayley_neumann': True}),
    ('Vanilla MLP 13 OFT', 'MLP', 'OFTConfig', 
     {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True, 'use_cayley_neumann': False}),
    ('Embedding + transformers Conv1D 1 OFT', 'EmbConv1D', 'OFTConfig', 
     {'r': 1, 'oft_block_size': 0, 'target_modules': ['emb']}),
    ('Embedding + transformers Conv1D 2 OFT', 'EmbConv1D', 'OFTConfig', 
     {'r': 1, 'oft_block_size': 0, 'target_modules': ['emb'], 'block_share': True}),
    ('Conv2d 1 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d']}),
    ('Conv2d 3 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'coft': True}),
    ('Conv2d 4 OFT', 'Conv2d', 'OFTConfig', 
     {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'block_share': True}),
    ('Conv2d 5 OFT', 'Conv2d', 'OFTConfig', 
     {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'coft': True, 'block_share': True}),
    ('Vanilla MLP 1 DEFT', 'MLP', 'DeftConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 DEFT', 'MLP', 'DeftConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 DEFT', 'MLP', 'DeftConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 4 DEFT qr', 'MLP', 'DeftConfig', {'target_modules': ['lin0'], 'decomposition_method': 'qr'}),
    ('Vanilla MLP 5 DEFT', 'MLP', 'DeftConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 7 DEFT alpha', 'MLP', 'DeftConfig', 
     {'target_modules': ['lin0'], 'decomposition_method': 'qr', 'alpha': 16}),
    ('Vanilla MLP 8 DEFT PaRa relu', 'MLP', 'DeftConfig', 
     {'target_modules': ['lin0'], 'decomposition_method': 'relu', 'para': True}),
    ('Vanilla MLP 9 DEFT PaRa qr', 'MLP', 'DeftConfig', 
     {'target_modules': ['lin0'], 'decomposition_method': 'qr', 'para': True}),
    ('Embedding + transformers Conv1D 1 DEFT', 'EmbConv1D', 'DeftConfig', {'target_modules': ['conv1d']}),
    ('Vanilla MLP 1 HRA', 'MLP', 'HRAConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 HRA', 'MLP', 'HRAConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 HRA', 'MLP', 'HRAConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 HRA', 'MLP', 'HRAConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Conv2d 1 HRA', 'Conv2d', 'HRAConfig', {'target_modules': ['conv2d']}),
    ('Vanilla MLP 1 MiSS', 'MLP', 'MissConfig', {'target_modules': 'lin0', 'r': 2}),
    ('Vanilla MLP 2 MiSS', 'MLP', 'MissConfig', {'target_modules': ['lin0'], 'r': 2}),
    ('Vanilla MLP 3 MiSS', 'MLP', 'MissConfig', {'target_modules': ['lin0', 'lin1'], 'r': 2}),
    ('Vanilla MLP 5 MiSS', 'MLP', 'MissConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'r': 2}),
    ('Vanilla MLP 1 MiSS', 'MLP', 'MissConfig', {'target_modules': 'lin0', 'r': 2, 'init_weights': 'bat'}),
    ('Vanilla MLP 2 MiSS', 'MLP', 'MissConfig', {'target_modules': ['lin0'], 'r': 2, 'init_weights': 'bat'}),
    ('Vanilla MLP 3 MiSS with bat', 'MLP', 'MissConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 2, 'init_weights': 'bat'}),
    ('Vanilla MLP 5 MiSS', 'MLP', 'MissConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'r': 2, 'init_weights': 'bat'}),
    ('LayerNorm 1 LNTuning', 'MLP_LayerNorm', 'LNTuningConfig', {'target_modules': 'layernorm0'}),
    ('LayerNorm 2 LNTuning', 'MLP_LayerNorm', 'LNTuningConfig', {'target_modules': ['layernorm0']}),
    ('LayerNorm 3 LNTuning', 'MLP_LayerNorm', 'LNTuningConfig', 
     {'target_modules': ['layernorm0'], 'modules_to_save': ['layernorm1']}),
    ('Linear 4 LNTuning', 'MLP_LayerNorm', 'LNTuningConfig', {'target_modules': 'lin0'}),
    ('Linear 5 LNTuning', 'MLP_LayerNorm', 'LNTuningConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 1 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 2}),
    ('Vanilla MLP 2 BOFT', 'MLP', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'modules_to_save': ['lin0'], 'boft_block_size': 2}),
    ('Vanilla MLP 3 BOFT', 'MLP', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_dropout': 0.1}),
    ('Vanilla MLP 4 BOFT', 'MLP', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 1}),
    ('Vanilla MLP 5 BOFT', 'MLP', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 0, 'boft_block_num': 2, 'boft_n_butterfly_factor': 1}),
    ('Vanilla MLP 6 BOFT', 'MLP', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 10, 'boft_block_num': 0, 'boft_n_butterfly_factor': 2}),
    ('Conv2d 1 BOFT', 'Conv2d', 'BOFTConfig', 
     {'target_modules': ['conv2d'], 'boft_block_size': 45, 'boft_block_num': 0, 'boft_n_butterfly_factor': 1}),
    ('Conv2d 2 BOFT', 'Conv2d', 'BOFTConfig', 
     {'target_modules': ['conv2d'], 'boft_block_size': 0, 'boft_block_num': 1, 'boft_n_butterfly_factor': 1}),
    ('MLP2 1 BOFT', 'MLP2', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 3}),
    ('MLP2 2 BOFT', 'MLP2', 'BOFTConfig', 
     {'target_modules': ['lin1'], 'boft_block_size': 0, 'boft_block_num': 8, 'boft_n_butterfly_factor': 3}),
    ('Conv2d2 1 BOFT', 'Conv2d2', 'BOFTConfig', 
     {'target_modules': ['conv2d'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 2}),
    ('Conv2d2 1 BOFT', 'Conv2d2', 'BOFTConfig', 
     {'target_modules': ['conv2d'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 3}),
    ('Vanilla MLP 1 SHiRA', 'MLP', 'ShiraConfig', {'r': 1, 'target_modules': 'lin0'}),
    ('Vanilla MLP 2 SHiRA', 'MLP', 'ShiraConfig', {'r': 1, 'target_modules': ['lin0']}),
    ('Vanilla MLP 3 SHiRA', 'MLP', 'ShiraConfig', {'r': 1, 'target_modules': ['lin1']}),
    ('Vanilla MLP 4 SHiRA', 'MLP', 'ShiraConfig', {'r': 1, 'target_modules': ['lin0', 'lin1'], 'random_seed': 56}),
    ('Vanilla MLP 5 SHiRA', 'MLP', 'ShiraConfig', {'r': 1, 'target_modules': ['lin0']}),
    ('Vanilla MLP 1 Supertuning', 'MLP', 'SupertuningConfig', {'sparsity': 0.5, 'target_modules': 'lin0'}),
    ('Vanilla MLP 2 Supertuning', 'MLP', 'SupertuningConfig', {'sparsity': 0.5, 'target_modules': ['lin0']}),
    ('Vanilla MLP 3 Supertuning', 'MLP', 'SupertuningConfig', {'sparsity': 0.5, 'target_modules': ['lin1']}),
    ('Vanilla MLP 4 Supertuning bottom-k', 'MLP', 'SupertuningConfig', 
     {'sparsity': 0.5, 'target_modules': ['lin0', 'lin1'], 'select_top': False}),
    ('Vanilla MLP 5 Supertuning Supra (r=2)', 'MLP', 'SupertuningConfig', 
     {'sparsity': 0.5, 'target_modules': ['lin0'], 'r': 2}),
    ('Vanilla MLP 1 VeRA', 'MLP', 'VeraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Embedding + transformers Conv1D 1 VeRA', 'EmbConv1D', 'VeraConfig', {'target_modules': ['conv1d']}),
    ('Vanilla MLP 1 TinyLoRA', 'MLP', 'TinyLoraConfig', {'target_modules': 'lin0', 'r': 2, 'u': 16}),
    ('Vanilla MLP 2 TinyLoRA', 'MLP', 'TinyLoraConfig', {'target_modules': ['lin0'], 'r': 2, 'u': 16}),
    ('Vanilla MLP 3 TinyLoRA', 'MLP', 'TinyLoraConfig', {'target_modules': ['lin1'], 'r': 2, 'u': 16}),
    ('Vanilla MLP 4 TinyLoRA', 'MLP', 'TinyLoraConfig', {'target_modules': ['lin0', 'lin1'], 'r': 2, 'u': 32}),
    ('Vanilla MLP 5 TinyLoRA', 'MLP', 'TinyLoraConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'r': 2, 'u': 16}),
    ('Vanilla MLP TinyLoRA weight_tying', 'MLP', 'TinyLoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 2, 'u': 8, 'weight_tying': 1.0}),
    ('Embedding + transformers Conv1D 1 TinyLoRA', 'EmbConv1D', 'TinyLoraConfig', 
     {'target_modules': ['conv1d'], 'r': 2, 'u': 16, 'init_v_bound': 0.5}),
    ('Embedding + transformers Conv1D 2 TinyLoRA', 'EmbConv1D', 'TinyLoraConfig', 
     {'target_modules': ['emb'], 'r': 2, 'u': 16}),
    ('Vanilla MLP 1 PVeRA', 'MLP', 'PveraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 PVeRA', 'MLP', 'PveraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 PVeRA', 'MLP', 'PveraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 PVeRA', 'MLP', 'PveraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 PVeRA', 'MLP', 'PveraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Embedding + transformers Conv1D 1 PVeRA', 'EmbConv1D', 'PveraConfig', {'target_modules': ['conv1d']}),
    ('Vanilla MLP 1 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency': 10, 'target_modules': 'lin0', 'init_weights': True}),
    ('Vanilla MLP 2 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency': 10, 'target_modules': ['lin0'], 'init_weights': True}),
    ('Vanilla MLP 3 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency': 10, 'target_modules': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 5 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency': 10, 'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 6 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency': 10, 'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 7 FourierFT', 'MLP', 'FourierFTConfig', 
     {'n_frequency_pattern': {'lin0': 5, 'lin1': 10}, 'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 1 GraLoRA', 'MLP', 'GraloraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 GraLoRA', 'MLP', 'GraloraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 GraLoRA', 'MLP', 'GraloraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 GraLoRA', 'MLP', 'GraloraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 GraLoRA', 'MLP', 'GraloraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 GraLoRA', 'MLP', 'GraloraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 7 Hybrid GraLoRA', 'MLP', 'GraloraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1'], 'hybrid_r': 4}),
    ('Embedding + transformers Conv1D 1 GraLoRA', 'EmbConv1D', 'GraloraConfig', 
     {'target_modules': ['conv1d'], 'gralora_k': 1}),
    ('Vanilla MLP 1 VBLoRA', 'MLP', 'VBLoRAConfig', {'target_modules': 'lin0', 'vector_length': 1, 'num_vectors': 5}),
    ('Vanilla MLP 2 VBLoRA', 'MLP', 'VBLoRAConfig', {'target_modules': ['lin0'], 'vector_length': 1, 'num_vectors': 5}),
    ('Vanilla MLP 3 VBLoRA', 'MLP', 'VBLoRAConfig', {'target_modules': ['lin1'], 'vector_length': 2, 'num_vectors': 5}),
    ('Vanilla MLP 4 VBLoRA', 'MLP', 'VBLoRAConfig', 
     {'target_modules': ['lin0', 'lin1'], 'vector_length': 1, 'num_vectors': 5}),
    ('Vanilla MLP 5 VBLoRA', 'MLP', 'VBLoRAConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'vector_length': 1, 'num_vectors': 5}),
    ('Embedding + transformers Conv1D 1 VBLoRA', 'EmbConv1D', 'VBLoRAConfig', 
     {'target_modules': ['conv1d'], 'vector_length': 1, 'num_vectors': 2}),
    ('Embedding + transformers Conv1D 1 trainable_tokens', 'EmbConv1D', 'TrainableTokensConfig', 
     {'target_modules': ['emb'], 'token_indices': [0, 1, 3], 'init_weights': False}),
    ('Vanilla MLP 1 OSF', 'MLP', 'OSFConfig', {}),
    ('Vanilla MLP 2 OSF', 'MLP', 'OSFConfig', {'target_svd_config': {'lin0.weight': 5, 'lin1.weight': 1}}),
    ('Vanilla MLP 1 RandLora', 'MLP', 'RandLoraConfig', {'target_modules': 'lin0', 'randlora_alpha': 1}),
    ('Vanilla MLP 2 RandLora', 'MLP', 'RandLoraConfig', {'target_modules': ['lin0'], 'randlora_alpha': 1}),
    ('Vanilla MLP 3 RandLora', 'MLP', 'RandLoraConfig', {'target_modules': ['lin1'], 'randlora_alpha': 1}),
    ('Vanilla MLP 4 RandLora', 'MLP', 'RandLoraConfig', {'target_modules': ['lin0', 'lin1'], 'randlora_alpha': 1}),
    ('Vanilla MLP 5 RandLora', 'MLP', 'RandLoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'sparse': True, 'randlora_alpha': 1}),
    ('Vanilla MLP 6 RandLora', 'MLP', 'RandLoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'very_sparse': True, 'randlora_alpha': 1}),
    ('Vanilla MLP 7 RandLora', 'MLP', 'RandLoraConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'randlora_alpha': 1}),
    ('Vanilla MLP 1 FRoD', 'MLP', 'FrodConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 FRoD', 'MLP', 'FrodConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 FRoD', 'MLP', 'FrodConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 FRoD', 'MLP', 'FrodConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 FRoD', 'MLP', 'FrodConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 1 UniLora', 'MLP', 'UniLoraConfig', {'target_modules': 'lin0', 'theta_d_length': 101}),
    ('Vanilla MLP 2 UniLora', 'MLP', 'UniLoraConfig', {'target_modules': ['lin0'], 'theta_d_length': 101}),
    ('Vanilla MLP 3 UniLora', 'MLP', 'UniLoraConfig', {'target_modules': ['lin1'], 'theta_d_length': 101}),
    ('Vanilla MLP 4 UniLora', 'MLP', 'UniLoraConfig', {'target_modules': ['lin0', 'lin1'], 'theta_d_length': 101}),
    ('Vanilla MLP 5 UniLora', 'MLP', 'UniLoraConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'theta_d_length': 101}),
    ('Embedding + transformers Conv1D 1 UniLora', 'EmbConv1D', 'UniLoraConfig', 
     {'target_modules': ['conv1d'], 'theta_d_length': 101}),
    ('Vanilla MLP 1 C3A', 'MLP', 'C3AConfig', {'block_size': 2, 'target_modules': 'lin0', 'init_weights': True}),
    ('Vanilla MLP 2 C3A', 'MLP', 'C3AConfig', {'block_size': 2, 'target_modules': ['lin0'], 'init_weights': True}),
    ('Vanilla MLP 3 C3A', 'MLP', 'C3AConfig', {'block_size': 2, 'target_modules': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 5 C3A', 'MLP', 'C3AConfig', 
     {'block_size': 10, 'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 6 C3A', 'MLP', 'C3AConfig', 
     {'block_size': 10, 'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 7 C3A', 'MLP', 'C3AConfig', 
     {'block_size_pattern': {'lin0': 5, 'lin1': 10}, 'target_modules': ['lin0', 'lin1'], 'modules_to_save': ['lin1'], 'init_weights': True}),
    ('Vanilla MLP 1 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': 'lin0', 'n_frequency': 8}),
    ('Vanilla MLP 2 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin0'], 'n_frequency': 8}),
    ('Vanilla MLP 3 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 4 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin0', 'lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 5 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 6 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': ['lin0'], 'n_frequency': 8, 'scaling': 25.0, 'wavelet_family': 'db1'}),
    ('Vanilla MLP 7 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': 'lin1', 'n_frequency': 8, 'use_idwt': False}),
    ('Vanilla MLP 8 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'sym2'}),
    ('Vanilla MLP 9 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'sym2', 'use_idwt': False}),
    ('Vanilla MLP 10 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'db1', 'proportional_parameters': True}),
    ('Vanilla MLP 1 RoAd', 'MLP', 'RoadConfig', {'target_modules': 'lin0', 'group_size': 2}),
    ('Vanilla MLP 2 RoAd', 'MLP', 'RoadConfig', {'target_modules': ['lin0'], 'group_size': 2}),
    ('Vanilla MLP 3 RoAd', 'MLP', 'RoadConfig', {'target_modules': ['lin1'], 'group_size': 2}),
    ('Vanilla MLP 4 RoAd', 'MLP', 'RoadConfig', {'target_modules': ['lin0', 'lin1'], 'group_size': 2}),
    ('Vanilla MLP 5 RoAd', 'MLP', 'RoadConfig', {'target_modules': ['lin0'], 'variant': 'road_2', 'group_size': 2}),
    ('Vanilla MLP 6 RoAd', 'MLP', 'RoadConfig', {'target_modules': ['lin0'], 'variant': 'road_4', 'group_size': 2}),
    ('Vanilla MLP 1 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': 'lin0', 'n_frequency': 8}),
    ('Vanilla MLP 2 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin0'], 'n_frequency': 8}),
    ('Vanilla MLP 3 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 4 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': ['lin0', 'lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 5 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'n_frequency': 8}),
    ('Vanilla MLP 6 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': ['lin0'], 'n_frequency': 8, 'scaling': 25.0, 'wavelet_family': 'db1'}),
    ('Vanilla MLP 7 WaveFT', 'MLP', 'WaveFTConfig', {'target_modules': 'lin1', 'n_frequency': 8, 'use_idwt': False}),
    ('Vanilla MLP 8 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'sym2'}),
    ('Vanilla MLP 9 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'sym2', 'use_idwt': False}),
    ('Vanilla MLP 10 WaveFT', 'MLP', 'WaveFTConfig', 
     {'target_modules': 'lin0', 'n_frequency': 16, 'wavelet_family': 'db1', 'proportional_parameters': True}),
    ('Vanilla MLP 1 DeLoRA', 'MLP', 'DeloraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 DeLoRA', 'MLP', 'DeloraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 DeLoRA', 'MLP', 'DeloraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 DeLoRA', 'MLP', 'DeloraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 DeLoRA', 'MLP', 'DeloraConfig', {'target_modules': ['lin0'], 'module_dropout': 0.1}),
    ('BD-LoRA A only', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'use_bdlora': Nested('BdLoraConfig', target_modules_bd_a=['lin0'], match_strict=False)}),
    ('BD-LoRA B only', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'use_bdlora': Nested('BdLoraConfig', target_modules_bd_b=['lin1'], nblocks=2, match_strict=False)}),
    ('BD-LoRA both A and B', 'MLP', 'LoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'use_bdlora': Nested('BdLoraConfig', target_modules_bd_a=['lin0'], target_modules_bd_b=['lin1'], nblocks=2)}),
    ('Vanilla MLP 1 PSOFT', 'MLP', 'PsoftConfig', {'target_modules': 'lin0', 'r': 4, 'psoft_alpha': 4}),
    ('Vanilla MLP 2 PSOFT', 'MLP', 'PsoftConfig', {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4}),
    ('Vanilla MLP 3 PSOFT', 'MLP', 'PsoftConfig', {'target_modules': ['lin1'], 'r': 2, 'psoft_alpha': 2}),
    ('Vanilla MLP 4 PSOFT', 'MLP', 'PsoftConfig', {'target_modules': ['lin0', 'lin1'], 'r': 2, 'psoft_alpha': 2}),
    ('Vanilla MLP 5 PSOFT (modules_to_save)', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'r': 4, 'psoft_alpha': 4}),
    ('Vanilla MLP PSOFT-SO (PSOFT with strict orthogonality)', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4, 'psoft_mag_a': False, 'psoft_mag_b': False}),
    ('Vanilla MLP PSOFT lowrank SVD niter 10', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4, 'psoft_svd': 'lowrank', 'psoft_svd_lowrank_niter': 10}),
    ('Vanilla MLP PSOFT Cayley-Neumann approximation term 5', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4, 'use_cayley_neumann': True, 'num_cayley_neumann_terms': 5, 'cayley_neumann_eps': 0.9}),
    ('Vanilla MLP PSOFT non-orthogonal R', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4, 'psoft_orth': False, 'psoft_mag_a': False, 'psoft_mag_b': False}),
    ('Vanilla MLP PSOFT PiSSA init', 'MLP', 'PsoftConfig', 
     {'target_modules': ['lin0'], 'r': 4, 'psoft_alpha': 4, 'ab_svd_init': 'pissa_init'}),
    ('Vanilla MLP 1 Lily', 'MLP', 'LilyConfig', {'target_modules': 'lin0', 'r': 2, 'stride_A': 1, 'num_B': 2}),
    ('Vanilla MLP 2 Lily', 'MLP', 'LilyConfig', {'target_modules': ['lin0'], 'r': 2, 'stride_A': 1, 'num_B': 2}),
    ('Vanilla MLP 3 Lily', 'MLP', 'LilyConfig', {'target_modules': ['lin1'], 'r': 2, 'stride_A': 1, 'num_B': 2}),
    ('Vanilla MLP 4 Lily', 'MLP', 'LilyConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 2, 'stride_A': 1, 'num_B': 2}),
    ('Vanilla MLP 5 Lily', 'MLP', 'LilyConfig', {'target_modules': ['lin0'], 'r': 4, 'stride_A': 1, 'num_B': 2}),
    ('Vanilla MLP 1 Peanut', 'MLP', 'PeanutConfig', {'target_modules': 'lin0', 'r': 2, 'depth': 0, 'act_fn': 'relu'}),
    ('Vanilla MLP 2 Peanut', 'MLP', 'PeanutConfig', {'target_modules': ['lin0'], 'r': 2, 'depth': 0, 'act_fn': 'relu'}),
    ('Vanilla MLP 3 Peanut', 'MLP', 'PeanutConfig', {'target_modules': ['lin1'], 'r': 2, 'depth': 0, 'act_fn': 'relu'}),
    ('Vanilla MLP 4 Peanut', 'MLP', 'PeanutConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 2, 'depth': 0, 'act_fn': 'relu'}),
    ('Vanilla MLP 5 Peanut', 'MLP', 'PeanutConfig', {'target_modules': 'lin0', 'r': 2, 'depth': 1, 'act_fn': 'gelu'}),
    ('Vanilla MLP 1 HiRA', 'MLP', 'HiraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 HiRA', 'MLP', 'HiraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 HiRA', 'MLP', 'HiraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 HiRA', 'MLP', 'HiraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 HiRA', 'MLP', 'HiraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 HiRA', 'MLP', 'HiraConfig', {'target_modules': ['lin0'], 'hira_dropout': 0.1}),
    ('Embedding + transformers Conv1D 1 HiRA', 'EmbConv1D', 'HiraConfig', {'target_modules': ['conv1d']}),
    ('Embedding + transformers Conv1D 2 HiRA', 'EmbConv1D', 'HiraConfig', {'target_modules': ['emb']}),
    ('Embedding + transformers Conv1D 3 HiRA', 'EmbConv1D', 'HiraConfig', {'target_modules': ['emb', 'conv1d']}),
    ('Conv1d HiRA', 'Conv1d', 'HiraConfig', {'target_modules': ['conv1d']}),
    ('Conv2d 1 HiRA', 'Conv2d', 'HiraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 HiRA', 'Conv2d', 'HiraConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv3d 1 HiRA', 'Conv3d', 'HiraConfig', {'target_modules': ['conv3d']}),
    ('Conv3d 2 HiRA', 'Conv3d', 'HiraConfig', {'target_modules': ['conv3d', 'lin0']}),
    ('Vanilla MLP 1 Adamss', 'MLP', 'AdamssConfig', {'target_modules': 'lin0', 'r': 8}),
    ('Vanilla MLP 2 Adamss', 'MLP', 'AdamssConfig', {'target_modules': ['lin0'], 'r': 8}),
    ('Vanilla MLP 3 Adamss', 'MLP', 'AdamssConfig', {'target_modules': ['lin1'], 'r': 2}),
    ('Vanilla MLP 4 Adamss', 'MLP', 'AdamssConfig', {'target_modules': ['lin0', 'lin1'], 'r': 8}),
    ('Vanilla MLP 5 Adamss with custom params', 'MLP', 'AdamssConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 8, 'num_subspaces': 3, 'subspace_rank': 2}),
    ('Vanilla MLP 6 Adamss with ASA', 'MLP', 'AdamssConfig', 
     {'target_modules': ['lin0', 'lin1'], 'r': 8, 'num_subspaces': 6, 'use_asa': True, 'asa_target_subspaces': 3}),
    ('Vanilla MLP 7 Adamss with dynamic rank', 'MLP', 'AdamssConfig', 
     {'target_modules': ['lin0'], 'r': 8, 'num_subspaces': 3, 'use_dynamic_rank': True, 'svd_threshold': 0.1}),
    ('Vanilla MLP 1 AdaLoRA', 'MLP', 'AdaLoraConfig', 
     {'target_modules': ['lin0'], 'init_lora_weights': False, 'total_step': 1, 'orth_reg_weight': 0}),
    ('Vanilla MLP 2 AdaLoRA', 'MLP', 'AdaLoraConfig', 
     {'target_modules': ['lin0', 'lin1'], 'init_lora_weights': False, 'total_step': 1}),
    ('Conv2d 1 AdaLoRA', 'Conv2d', 'AdaLoraConfig', 
     {'target_modules': ['conv2d'], 'init_lora_weights': False, 'total_step': 1}),
    ('Conv2d 2 AdaLoRA', 'Conv2d', 'AdaLoraConfig', 
     {'target_modules': ['conv2d', 'lin0'], 'init_lora_weights': False, 'total_step': 1}),
]
