"""aLoRA (activated LoRA, Greenewald et al. 2025, arXiv 2504.12397; PEFT's `alora_invocation_tokens`):
the LoRA acts only on tokens from the last occurrence of the invocation sequence on, per row.

The formula written out on a toy model; PEFT as the oracle on a tiny Llama (logits, incremental
calls with a KV cache, `generate`); files both ways (PEFT's load with adaptkit, adaptkit's load with
PEFT, `adaptkit train` with the key); every merge path refused in one line, as PEFT refuses to merge."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from builders import tiny_gpt2, tiny_llama
from hostile import assert_one_line_error, run_cli
from text_models import counting, llama_dir, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

TARGETS = ["q_proj", "v_proj", "down_proj"]
# name -> (PEFT LoraConfig settings, seed of the random adapter tensors); on the tiny Llama but for "gpt2_"
CASES = {
    "gpt2_conv1d": (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                         alora_invocation_tokens=[5, 6]), 5),
    "two_tokens": (dict(r=4, lora_alpha=8, alora_invocation_tokens=[5, 6]), 1),
    "one_token_rslora_bias": (dict(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, alora_invocation_tokens=[7]), 2),
    "patterns_three_tokens": (dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3},
                                   alora_invocation_tokens=[5, 6, 7]), 3),
    "two_tokens_other": (dict(r=4, lora_alpha=8, alora_invocation_tokens=[7, 5]), 4),  # same shapes as two_tokens
}


def rows(tokens: list[int], width: int = 10) -> torch.Tensor:
    """Rows placing the invocation sequence differently: inside, twice (the last counts), absent, at the
    very end, only its first token at the end, at the start only."""
    n = len(tokens)
    filler = torch.randint(20, 128, (6, width), generator=torch.Generator().manual_seed(n))
    ids = filler.clone()
    ids[0, 2:2 + n] = torch.tensor(tokens)
    ids[1, 0:n], ids[1, 5:5 + n] = torch.tensor(tokens), torch.tensor(tokens)
    ids[3, width - n:] = torch.tensor(tokens)
    ids[4, -1] = tokens[0]
    ids[5, 0:n] = torch.tensor(tokens)
    return ids


def starts(ids: torch.Tensor, tokens: list[int]) -> list[int | None]:
    """The paper's rule, by a plain loop: per row, where the last occurrence of `tokens` starts (None: absent)."""
    found = []
    for row in ids.tolist():
        hits = [i for i in range(len(row) - len(tokens) + 1) if row[i:i + len(tokens)] == tokens]
        found.append(hits[-1] if hits else None)
    return found


def rel(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def base_of(case: str, base, gpt2):
    return gpt2 if case.startswith("gpt2_") else base


@pytest.fixture(scope="module")
def saved(base, gpt2, tmp_path_factory) -> dict:
    """PEFT-written aLoRA folders by case (random non-zero A, B and bias), with PEFT's model for each."""
    found = {}
    for name, (settings, seed) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings = {"target_modules": TARGETS, **settings}
            config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **settings)
            pm = get_peft_model(copy.deepcopy(base_of(name, base, gpt2)), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out = tmp_path_factory.mktemp(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT 0.21 takes lora_bias's 1-D B bias for an unsharded ZeRO-3 tensor
            pm.save_pretrained(out)
        found[name] = (out, pm.eval())
    return found


def ours(base, folder, name="default"):
    model = copy.deepcopy(base)
    return model, ak.load_adapter(model, folder, name=name)


# ---- the formula --------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(16, 6), nn.Linear(6, 5)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


def test_forward_follows_the_formula():
    torch.manual_seed(0)
    model = Toy()
    w, b0 = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    ak.inject(model, "lora", r=2, lora_alpha=6, target_modules=["lin"], init_lora_weights=False,
              alora_invocation_tokens=[3, 4])
    p = model.lin.branches["default"].params
    a, b = p["lora_A"].detach(), p["lora_B"].detach()
    ids = torch.tensor([[1, 3, 4, 2, 3, 4, 5, 6], [3, 4, 1, 2, 5, 6, 7, 8], [1, 2, 5, 6, 7, 8, 9, 3],
                        [1, 2, 5, 6, 7, 8, 3, 4]])
    h = model.emb(ids).detach()
    expected = h @ w.T + b0
    for i, start in enumerate(starts(ids, [3, 4])):  # y_t = W·x_t + [t ≥ start]·(α/r)·B·A·x_t
        for t in range(ids.shape[1]):
            if start is not None and t >= start:
                expected[i, t] += 6 / 2 * (b @ (a @ h[i, t]))
    assert starts(ids, [3, 4]) == [4, 0, None, 6]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)
        torch.testing.assert_close(model(input_ids=ids), expected)  # the ids by keyword too


# ---- PEFT as the oracle -------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_s_outputs(case, base, gpt2, saved):
    folder, pm = saved[case]
    tokens = CASES[case][0]["alora_invocation_tokens"]
    ids = rows(tokens)
    base = base_of(case, base, gpt2)
    model, _ = ours(base, folder)
    expected, plain = logits(pm, ids), logits(base, ids)
    assert rel(logits(model, ids), expected) <= 1e-4
    for i, start in enumerate(starts(ids, tokens)):  # base model before the invocation, adapted from it on
        cut = ids.shape[1] if start is None else start
        torch.testing.assert_close(expected[i, :cut], plain[i, :cut], atol=0, rtol=0)
        assert start is None or rel(expected[i, cut:], plain[i, cut:]) > 1e-2


def test_left_padding_and_attention_mask(base, saved):
    folder, pm = saved["two_tokens"]
    ids = rows([5, 6])
    ids[2:, :3] = 0  # left padding, masked out
    mask = torch.ones_like(ids)
    mask[2:, :3] = 0
    model, _ = ours(base, folder)
    assert rel(logits(model, ids, attention_mask=mask), logits(pm, ids, attention_mask=mask)) <= 1e-4


def test_cached_continuation_counts_the_cached_tokens(base, saved):
    """Prompt, then more tokens with the KV cache: equal to PEFT on the whole sequence at once (row 0:
    invoked in the prompt, row 1: invoked in the new tokens, row 2: never)."""
    folder, pm = saved["two_tokens"]
    first = torch.tensor([[9, 5, 6, 30, 31], [9, 10, 11, 30, 31], [9, 10, 11, 30, 31]])
    then = torch.tensor([[40, 41, 42], [40, 5, 6], [40, 41, 42]])
    whole = logits(pm, torch.cat([first, then], 1))
    model, _ = ours(base, folder)
    with torch.no_grad():
        cache = model(input_ids=first, use_cache=True).past_key_values
        more = model(input_ids=then, past_key_values=cache, use_cache=True).logits
    assert rel(more, whole[:, -3:]) <= 1e-4


def test_generate_equals_peft(base, saved):
    folder, pm = saved["two_tokens"]
    ids = rows([5, 6])[[0, 2, 3]]  # invoked, absent, invoked at the end
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, **kwargs)
        model, _ = ours(base, folder)
        found = model.generate(input_ids=ids, **kwargs)
        plain = base.generate(input_ids=ids, **kwargs)
    assert torch.equal(found.sequences, expected.sequences)
    assert max(rel(f, e) for f, e in zip(found.logits, expected.logits)) <= 1e-4
    assert rel(expected.logits[-1][0], plain.logits[-1][0]) > 1e-2  # the adapter acts while decoding


def test_gradients_equal_peft_with_and_without_checkpointing(base, saved):
    """Gradient checkpointing runs the layers again during backward, after the call: same gradients."""
    folder, _ = saved["two_tokens"]
    ids = rows([5, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True).train()
    pm(input_ids=ids, labels=ids).loss.backward()
    expected = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
                for n, p in pm.named_parameters() if p.grad is not None}
    for checkpointing in (False, True):
        model, handle = ours(base, folder)
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5: gradient_checkpointing_enable, renamed
        model.train()(input_ids=ids, labels=ids).loss.backward()
        found = dict(handle.parameters())
        assert sorted(found) == sorted(expected)
        assert max(rel(found[n].grad, expected[n]) for n in expected) <= 1e-4


def test_checkpointing_refuses_two_forwards_before_one_backward(base, saved):
    model, _ = ours(base, saved["two_tokens"][0])
    model.activation_checkpointing_enable()
    ids = rows([5, 6])
    loss = model.train()(input_ids=ids, labels=ids).loss + model(input_ids=ids, labels=ids).loss
    loss.backward()  # the same offsets twice: no doubt which ones a recomputation needs
    loss = model(input_ids=ids, labels=ids).loss + model(input_ids=ids.flip(1), labels=ids).loss
    with pytest.raises(AdaptkitError, match="needs one forward per backward"):
        loss.backward()


# ---- files both ways ----------------------------------------------------------------------------

def peft_loads(base, folder) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def test_saved_again_peft_loads_it_equal(base, saved, tmp_path):
    folder, pm = saved["one_token_rslora_bias"]
    model, handle = ours(base, folder)
    handle.save(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == [7] and config["task_type"] == "CAUSAL_LM"
    ids = rows([7])
    assert rel(logits(peft_loads(base, tmp_path / "again"), ids), logits(pm, ids)) <= 1e-4


def test_injected_adapter_loads_in_peft(base, tmp_path):
    model = copy.deepcopy(base)
    handle = ak.inject(model, "lora", r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                       alora_invocation_tokens=[5, 6])
    handle.save(tmp_path / "new")
    ids = rows([5, 6])
    assert rel(logits(peft_loads(base, tmp_path / "new"), ids), logits(model, ids)) <= 1e-4


def test_train_with_the_key_writes_an_alora_peft_loads(tmp_path):
    folder = llama_dir(tmp_path / "llama")
    data = write_jsonl(tmp_path / "counting.jsonl", counting())
    five = 4 + 5  # "five" in the word-level vocabulary (4 special tokens first)
    result = run_cli("-q", "train", "--base", folder, "--variant", "lora", "--set", "r=4", "--set",
                     f"alora_invocation_tokens=[{five}]", "--data", data, "--max-steps", "3", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == [five]
    trained = LlamaForCausalLM.from_pretrained(folder).eval()
    model, _ = ours(trained, tmp_path / "out")
    ids = torch.tensor([[2, 4, 9, 10, 11], [2, 4, 5, 6, 7]])
    assert rel(logits(peft_loads(trained, tmp_path / "out"), ids), logits(model, ids)) <= 1e-4
    assert torch.equal(logits(model, ids)[1], logits(trained, ids)[1])  # no invocation: the base model
    evaluated = run_cli("-q", "eval", tmp_path / "out", "--data", data, "--json")  # the live plane, batch by batch
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["loss"] > 0, evaluated.output


def test_hot_swap_takes_the_new_invocation(base, saved):
    model, handle = ours(base, saved["two_tokens"][0])
    handle.load(saved["two_tokens_other"][0], swap=True)
    ids = torch.cat([rows([5, 6]), rows([7, 5])])
    assert rel(logits(model, ids), logits(saved["two_tokens_other"][1], ids)) <= 1e-4


def test_inspect_shows_the_invocation(saved):
    result = run_cli("inspect", saved["patterns_three_tokens"][0])
    assert result.exit_code == 0 and "  alora_invocation_tokens 5, 6, 7\n" in result.output


# ---- refusals -------------------------------------------------------------------------------------

def cli_paths(tmp, llama, alora):
    recipe = tmp / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {llama}+{alora}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {llama}\n    parameters: {{weight: 0.5}}\n")
    return {
        "merge_into_base": ["merge", "--base", llama, "-m", alora, "-o", tmp / "m1"],
        "merge_adapters": ["merge", "--method", "linear", "-m", f"{alora}:0.5", "-m", f"{alora}:0.5", "--rank", "4",
                           "-o", tmp / "m2"],
        "recipe_base_plus_adapter": ["merge", recipe, "-o", tmp / "m3"],
        "convert_peft": ["convert", alora, "--to", "peft", "-o", tmp / "c1"],
        "convert_resize": ["convert", alora, "--to", "peft", "--rank", "2", "-o", tmp / "c2"],
        "convert_kohya": ["convert", alora, "--to", "kohya", "-o", tmp / "c3"],
    }


@pytest.mark.parametrize("path", ["merge_into_base", "merge_adapters", "recipe_base_plus_adapter", "convert_peft",
                                  "convert_resize", "convert_kohya"])
def test_cli_merge_and_convert_refuse(path, saved, llama_dir, tmp_path):
    args = cli_paths(tmp_path, llama_dir, saved["two_tokens"][0])[path]
    assert_one_line_error(run_cli(*args), "aLoRA cannot be merged: ")
    assert not any(p.name[0] in "mc" for p in tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("action", ["merge", "merge_and_unload", "quantization_aware", "save_kohya"])
def test_live_merges_refuse(action, base, saved, tmp_path):
    model, handle = ours(base, saved["two_tokens"][0])
    calls = {"merge": handle.merge, "merge_and_unload": handle.merge_and_unload,
             "quantization_aware": lambda: handle.quantization_aware("int8"),
             "save_kohya": lambda: handle.save(tmp_path / "k", format="kohya")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaptkitError, match="aLoRA cannot be merged: "):
        calls[action]()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
    assert rel(logits(model, rows([5, 6])), logits(saved["two_tokens"][1], rows([5, 6]))) <= 1e-4


@pytest.mark.parametrize("variant,settings,fragment", [
    ("lora", dict(use_dora=True), "aLoRA with use_dora"),
    ("lora", dict(init_lora_weights="pissa"), "aLoRA with PiSSA"),
    ("lora", dict(target_modules=["embed_tokens"]), "aLoRA adapts linear layers only"),
    ("delta_lora", dict(), "aLoRA with delta_lora"),
    ("lora", dict(alora_invocation_tokens="5"), "must be a list of token ids"),
    ("lora", dict(alora_invocation_tokens=[5, -1]), "must be a list of token ids"),
], ids=["dora", "pissa", "embedding", "delta_lora", "text", "negative"])
def test_unsupported_settings_refuse(variant, settings, fragment, base):
    config = {"r": 2, "target_modules": TARGETS, "alora_invocation_tokens": [5], **settings}
    with pytest.raises(AdaptkitError, match=fragment):
        ak.inject(copy.deepcopy(base), variant, **config)


@pytest.mark.parametrize("call", ["inputs_embeds", "inner_model"])
def test_calls_without_the_ids_refuse(call, base, saved):
    model, _ = ours(base, saved["two_tokens"][0])
    ids = rows([5, 6])
    with pytest.raises(AdaptkitError, match="aLoRA finds where it acts in the model's input_ids"):
        if call == "inputs_embeds":
            model(inputs_embeds=model.model.embed_tokens(ids))
        else:
            model.model(input_ids=ids)  # a part of the model on its own: no offsets of this call
    assert rel(logits(model, ids), logits(saved["two_tokens"][1], ids)) <= 1e-4  # the next call is right


def test_no_invocation_means_no_gradient(base, saved):
    model, handle = ours(base, saved["two_tokens"][0])
    ids = rows([5, 6])[[2]]  # no invocation
    model(input_ids=ids).logits.sum().backward()
    grads = [p.grad for _, p in handle.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)
