"""Router (gate) weights of a mixture of experts made from dense models, as mergekit-moe computes them.

A mixture-of-experts layer routes a token with hidden state x to the experts with the largest logits W·x,
W of shape (experts, hidden). mergekit-moe fills W per `gate_mode` (docs/moe.md in mergekit):

- `hidden` (= `hidden_last`): W[l, e] is the base model's hidden state at the input of layer l for
  the last token of each of expert e's positive prompts, averaged over the prompts; `hidden_avg`
  averages over every position instead (padding positions included, as mergekit does).
- `cheap_embed`: the token embeddings of the prompts, summed over the real tokens of every prompt
  and normalized; the same vector for every layer.
- `random`: standard normal; `uniform_random`: U(-1/√hidden, 1/√hidden), nn.Linear's initialization.

With `negative_prompts` the vector for them is subtracted; then each W[l, e] is scaled to unit length
(‖v‖ clamped below at 1e-8). The hidden pass runs the base in bfloat16, as mergekit does, so the
gates are mergekit's numbers; each prompt is `<bos>` + text, left-padded with the BOS token.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import AdaptkitError
from .tokenizer import load_tokenizer

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")
GATE_MODES = (*HIDDEN_MODES, "cheap_embed", *RANDOM_MODES)
#: mergekit's threshold on the condition number of a layer's gate matrix before it warns.
DEGENERATE_CONDITION = 5.0


def gate_vectors(mode: str, experts: list, *, layers: int, hidden: int, base_folder: Path,
                 embed: torch.Tensor | None, generator: torch.Generator, device: str = "cpu",
                 base_bits: int | None = None) -> torch.Tensor:
    """W of shape (layers, experts, hidden) for `mode`; `experts` have `positive` and `negative`
    prompt lists; `embed` is the base's embedding matrix (read only for cheap_embed); `base_bits` (4 or 8)
    runs the base for hidden states quantized by bitsandbytes, as mergekit-moe's --load-in-4bit/8bit."""
    if mode == "random":
        return torch.randn((layers, len(experts), hidden), generator=generator)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden), generator=generator) * 2 * scale - scale
    tokenizer = _tokenizer(base_folder)
    if mode == "cheap_embed":
        def encode(prompts: list[str]) -> torch.Tensor:
            return _cheap_embedding(embed, _tokenize(prompts, tokenizer), layers)
    else:
        model = _hidden_model(base_folder, device, base_bits)

        def encode(prompts: list[str]) -> torch.Tensor:
            try:
                return _hidden_states(model, _tokenize(prompts, tokenizer).to(device), average=mode == "hidden_avg").cpu()
            except RuntimeError as e:  # (e.g. its CPU 4-bit kernel: layers whose inputs are not 64-entry blocks)
                if base_bits is None:
                    raise
                raise AdaptkitError(f"--load-in-{base_bits}bit: bitsandbytes cannot run this base quantized "
                                    f"({str(e).splitlines()[0]}); run without the option") from None
    vectors = []
    for expert in experts:
        v = encode(expert.positive)
        if expert.negative:
            v -= encode(expert.negative)
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(v)
    return torch.stack(vectors, dim=0).permute(1, 0, 2)  # (experts, layers, hidden) -> (layers, experts, hidden)


def conditions(gates: torch.Tensor) -> list[float]:
    """Each layer's condition number of its router matrix (rows × hidden, in float32, as mergekit computes it)."""
    return [float(torch.linalg.cond(gates[i].float())) for i in range(gates.shape[0])]


def similarity(gates: torch.Tensor) -> list[list[float]]:
    """The cosine similarity of every two router rows, averaged over the layers (rows × rows)."""
    unit = gates.float() / gates.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return (unit @ unit.transpose(1, 2)).mean(dim=0).tolist()


def degenerate_layers(conditions: list[float]) -> list[int]:
    """Layers whose router matrix has a condition number above DEGENERATE_CONDITION: prompts too alike
    to tell the experts apart (mergekit warns of the same), with a one-line warning."""
    found = [i for i, c in enumerate(conditions) if c > DEGENERATE_CONDITION]
    if found:
        warnings.warn(f"degenerate routing in layer(s) {', '.join(map(str, found))}: the experts' prompts are "
                      "too alike, some experts will be little used", stacklevel=2)
    return found


def _tokenizer(folder: Path):
    """The base's tokenizer as mergekit sets it up for the prompts: left padding with BOS (else EOS)."""
    try:
        import transformers  # noqa: F401  (load_tokenizer's)
    except ImportError:
        raise AdaptkitError("gate modes from prompts need transformers (pip install 'adaptkit[train]')") from None
    tokenizer = load_tokenizer(folder)
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise AdaptkitError(f"{folder}: the tokenizer has no BOS or EOS token to pad the prompts with")
    return tokenizer


def _tokenize(prompts: list[str], tokenizer):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _cheap_embedding(embed: torch.Tensor, tokenized, layers: int) -> torch.Tensor:
    """Σ over prompts and real tokens of the token embeddings (float32), normalized, once per layer.
    Indexing gives the one-hot product mergekit computes exactly (every other term is a zero)."""
    h = embed.float()[tokenized["input_ids"]]  # (batch, seq, hidden)
    summed = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


def _hidden_model(folder: Path, device: str, bits: int | None = None):
    """The base in bfloat16 on `device`; with `bits`, its linear layers quantized on loading by
    bitsandbytes (transformers' BitsAndBytesConfig(load_in_4bit / load_in_8bit), its defaults, as
    mergekit-moe loads it: the same numbers, a quarter or half of the memory)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise AdaptkitError("gate_mode hidden needs transformers (pip install 'adaptkit[train]'); "
                            "cheap_embed and random do not") from None
    from transformers.utils import logging as hf_logging

    options: dict = {}
    if bits is not None:
        try:
            with _quiet_bitsandbytes():
                import bitsandbytes  # noqa: F401
        except ImportError:
            raise AdaptkitError(f"--load-in-{bits}bit needs bitsandbytes (pip install bitsandbytes)") from None
        from transformers import BitsAndBytesConfig

        # (placed by device_map: a model quantized by bitsandbytes cannot be moved with .to)
        options = {"quantization_config": BitsAndBytesConfig(**{f"load_in_{bits}bit": True}), "device_map": device}
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load is noise beside one line of report
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, trust_remote_code=False,
                                                     **options)
    except (OSError, ValueError) as e:
        raise AdaptkitError(f"{folder}: cannot load the base model for the hidden states "
                            f"({str(e).splitlines()[0]})") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return (model if bits is not None else model.to(device)).eval()


@contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """bitsandbytes' warnings kept below ERROR out: on importing, a CPU-only install logs that an optional
    faster kernel package is absent, and its 8-bit matmul logs at every layer that it computes bf16 inputs
    in fp16 (its way, and mergekit's). Neither is news to this command's user."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def _hidden_states(model, tokenized, *, average: bool) -> torch.Tensor:
    """(layers, hidden): the input of each layer (the embeddings, then each layer's output but the
    last) at the last position, or averaged over positions, then averaged over the prompts."""
    with torch.no_grad(), _quiet_bitsandbytes():
        output = model(**tokenized, output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # (layers, batch, seq, hidden)
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


__all__ = ["DEGENERATE_CONDITION", "GATE_MODES", "HIDDEN_MODES", "RANDOM_MODES", "conditions", "degenerate_layers",
           "gate_vectors", "similarity"]
