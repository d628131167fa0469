"""Prompt learning: prompt tuning and P-tuning (X' = [P; E(x)]) and prefix tuning (a cache of n keys and
values in front at every layer), on a tiny Llama (grouped-query attention, RoPE) and GPT-2.

The math is written out against the base model itself: P = E(p) for real tokens p gives the base
model's logits on [p; x]; a prefix table built from the base model's own cache of p gives its logits
on x after p. PEFT writes every case of its matrix in scope (prompt tuning RANDOM / SAMPLE_VOCAB /
TEXT, P-tuning MLP / LSTM, prefix tuning with and without projection, zero start) and adaptkit loads it with
PEFT's logits and loss (left-padded attention masks, labels); adaptkit writes and PEFT loads. Merges
and conversions refuse them in one line, on every CLI path.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import adaptkit as ak
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from builders import tiny_gpt2, tiny_llama
from text_models import save_tokenizer

ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
N = 4
IDS = torch.tensor([[1, 3, 5, 9, 7, 2], [5, 5, 3, 0, 7, 11]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # the second row padded on the left
PREFIX = torch.tensor([[20, 21, 22, 23]])  # real tokens whose embeddings / cache stand in for the prompt
CASES = {  # id -> PEFT config (CAUSAL_LM)
    "prompt-random": lambda tok: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prompt-vocab": lambda tok: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                   prompt_tuning_init="SAMPLE_VOCAB"),
    "prompt-text": lambda tok: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                  prompt_tuning_init="TEXT", prompt_tuning_init_text="red cat sat",
                                                  tokenizer_name_or_path=tok),
    "ptuning-mlp": lambda tok: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    "ptuning-lstm": lambda tok: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16,
                                                    encoder_reparameterization_type="LSTM"),
    "prefix": lambda tok: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix-zero": lambda tok: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, init_weights="zero"),
    "prefix-projection": lambda tok: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                        prefix_projection=True, encoder_hidden_size=16),
}
TOL = dict(atol=1e-5, rtol=1e-4)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
    """(arch, case) -> (the base, PEFT's folder, PEFT's logits with the mask, PEFT's loss with labels)."""
    root = tmp_path_factory.mktemp("prompt")
    save_tokenizer(root / "tok")
    made = {}
    for arch, build in ARCHS.items():
        base = build()
        for case, config in CASES.items():
            torch.manual_seed(2)
            peft = get_peft_model(copy.deepcopy(base), config(str(root / "tok"))).eval()
            peft.save_pretrained(root / arch / case)
            out = run(peft, input_ids=IDS, attention_mask=MASK, labels=IDS)
            made[arch, case] = (base, root / arch / case, out.logits, out.loss)
    return made


def cache_table(base, prefix: torch.Tensor) -> torch.Tensor:
    """The base model's own cache of `prefix` as PEFT's table: row t = [K_0 | V_0 | K_1 | V_1 | …] at t."""
    cache = run(base, input_ids=prefix, use_cache=True).past_key_values
    rows = [torch.cat([layer.keys[0, :, t].flatten(), layer.values[0, :, t].flatten()]) for t in range(prefix.shape[1])
            for layer in cache.layers]
    return torch.stack(rows).reshape(prefix.shape[1], -1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prompt_is_virtual_tokens_in_front(arch):
    base = ARCHS[arch]()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "prompt_tuning", num_virtual_tokens=N)
    with torch.no_grad():
        handle.adapters["default"].shared["prompt_embeddings"].copy_(base.get_input_embeddings()(PREFIX)[0])
    ones = torch.ones(2, N, dtype=MASK.dtype)
    expected = run(base, input_ids=torch.cat([PREFIX.expand(2, -1), IDS], 1), attention_mask=torch.cat([ones, MASK], 1))
    torch.testing.assert_close(run(model, input_ids=IDS, attention_mask=MASK).logits, expected.logits, **TOL)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prefix_is_a_cache_in_front(arch):
    base = ARCHS[arch]()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "prefix_tuning", num_virtual_tokens=N)
    with torch.no_grad():
        handle.adapters["default"].shared["prompt_embeddings"].copy_(cache_table(base, PREFIX))
    expected = run(base, input_ids=torch.cat([PREFIX, IDS[:1]], 1)).logits[:, N:]
    torch.testing.assert_close(run(model, input_ids=IDS[:1]).logits, expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_writes_adaptkit_loads(arch, case, peft_made, tmp_path):
    base, folder, logits, loss = peft_made[arch, case]
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, folder)
    out = run(model, input_ids=IDS, attention_mask=MASK, labels=IDS)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, loss, **TOL)
    assert not torch.allclose(run(base, input_ids=IDS).logits, run(model, input_ids=IDS).logits[:, -IDS.shape[1]:])
    with handle.disabled():
        torch.testing.assert_close(run(model, input_ids=IDS).logits, run(base, input_ids=IDS).logits, atol=0, rtol=0)
    # and back: adaptkit writes, PEFT loads it without a warning about its config
    handle.save(tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert not [w for w in caught if "config" in str(w.message).lower() or "keyword" in str(w.message)]
    torch.testing.assert_close(run(peft, input_ids=IDS, attention_mask=MASK).logits, logits, **TOL)
    handle.remove()
    torch.testing.assert_close(run(model, input_ids=IDS).logits, run(base, input_ids=IDS).logits, atol=0, rtol=0)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("argv", [
    ["merge", "--base", "{base}", "-m", "{a}", "-o", "{out}"],
    ["merge", "--method", "linear", "-m", "{a}:0.5", "-m", "{a}:0.5", "--rank", "4", "-o", "{out}"],
    ["convert", "{a}", "--to", "peft", "-o", "{out}"],
    ["convert", "{a}", "--to", "peft", "--rank", "2", "--base", "{base}", "-o", "{out}"],
    ["convert", "{a}", "--to", "kohya", "-o", "{out}"],
], ids=["into-base", "adapters", "to-lora", "to-lora-svd", "to-kohya"])
@pytest.mark.parametrize("case, what", [("prompt-random", "prompt tuning"), ("ptuning-mlp", "P-tuning"),
                                        ("prefix", "prefix tuning")], ids=["prompt", "ptuning", "prefix"])
def test_merges_and_conversions_refuse_in_one_line(argv, case, what, peft_made, tmp_path):
    base, folder, _, _ = peft_made["llama", case]
    base.save_pretrained(tmp_path / "base")
    args = [a.format(base=tmp_path / "base", a=folder, out=tmp_path / "out") for a in argv]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and f"{what} is not a weight delta" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_live_merge_is_refused(peft_made):
    base, folder, _, _ = peft_made["gpt2", "prompt-random"]
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, folder)
    for call in (handle.merge, handle.merge_and_unload):
        with pytest.raises(AdaptkitError, match="cannot be merged"):
            call()


def test_cached_calls_continue_only_their_own_cache(peft_made):
    """Cached generation (tests/test_generate.py: PEFT's tokens) puts the virtual tokens into an empty cache;
    a later call on a cache they did not begin (its mask counts every cached position) and a legacy tuple
    cache are refused by name."""
    for case in ("prompt-random", "prefix"):
        base, folder, _, _ = peft_made["llama", case]
        model = copy.deepcopy(base)
        ak.load_adapter(model, folder)
        cache = run(base, input_ids=IDS, use_cache=True).past_key_values
        mask = torch.ones(2, IDS.shape[1] + 1, dtype=torch.long)
        with pytest.raises(AdaptkitError, match=f"a cache this adapter's {N} virtual tokens did not begin"):
            model(input_ids=IDS[:, :1], attention_mask=mask, past_key_values=cache)
        with pytest.raises(AdaptkitError, match="past_key_values as a tuple .a legacy cache. is not supported"):
            model(input_ids=IDS, past_key_values=((torch.zeros(1), torch.zeros(1)),))


@pytest.mark.parametrize("variant, settings, message", [
    ("p_tuning", {}, "prompt encoder .MLP/LSTM. is not supported"),
    ("prefix_tuning", {"prefix_projection": True}, "prefix_projection. is not supported"),
    ("prompt_tuning", {"prompt_tuning_init": "TEXT"}, "TEXT needs the tokenizer"),
    ("prompt_tuning", {"prompt_tuning_init": "ZEROS"}, "one of RANDOM, SAMPLE_VOCAB, TEXT"),
    ("prompt_tuning", {"target_modules": ["q_proj"]}, "takes no target_modules"),
    ("prefix_tuning", {"num_layers": 3}, "num_layers=3 but this model has 2"),
    ("prefix_tuning", {"init_weights": "ones"}, "init_weights must be one of zero"),
], ids=["ptuning-encoder", "prefix-projection", "text", "init", "targets", "shape", "prefix-init"])
def test_what_is_not_implemented_is_refused_by_name(variant, settings, message):
    with pytest.raises(AdaptkitError, match=message) as err:
        ak.inject(tiny_llama(), variant, num_virtual_tokens=N, **settings)
    assert "\n" not in str(err.value)


def test_other_task_types_are_refused(peft_made, tmp_path):
    import shutil

    _, folder, _, _ = peft_made["llama", "prompt-random"]
    shutil.copytree(folder, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(AdaptkitError, match="task_type CAUSAL_LM.*'SEQ_CLS'"):
        ak.load_adapter(tiny_llama(), tmp_path / "a")


def test_fresh_starts_as_peft():
    """RANDOM and a prefix table start at N(0, 1); SAMPLE_VOCAB at rows of the embedding; prefix "zero" at 0."""
    model = tiny_llama()
    vocab = ak.inject(model, "prompt_tuning", num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")
    table = model.get_input_embeddings().weight
    for row in vocab.adapters["default"].shared["prompt_embeddings"]:
        assert (table == row).all(dim=1).any()
    zero = ak.inject(tiny_llama(), "prefix_tuning", num_virtual_tokens=N, init_weights="zero")
    shared = zero.adapters["default"].shared["prompt_embeddings"]
    assert shared.shape == (N, 2 * 2 * 16) and not shared.any()  # layers · (K, V) · 2 kv heads · head size 8
    random = ak.inject(tiny_llama(), "prefix_tuning", num_virtual_tokens=N).adapters["default"].shared
    assert 0.5 < float(random["prompt_embeddings"].std()) < 1.5
