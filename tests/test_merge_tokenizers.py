"""Tokenizers in merge recipes (`tokenizer_source`, the `tokenizer:` block, `chat_template`) against
mergekit on the same recipes: every tensor, the output vocabulary, config.json's vocab_size and the
chat template; the row rules written out; bad values one line.

Tiny Llamas, as mergekit's own tokenizer tests build them: `base` (64 tokens), `padded` (64
rows but 4 more tokens past its vocab_size, which no output may use), `chatml` and `chatml_b` (66
rows: two added ChatML tokens; different weights; chat templates), `plain` (the same tokenizer, no
template), `bare` (no tokenizer at all), `wide` (a 65th plain BPE token) and `tools` (that, and two
more added tokens). mergekit numbers the added tokens a union takes from several inputs in a hash
order; where only one input adds tokens the ids, and every byte, must agree.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from adaptkit.cli.boundary import one_line
from adaptkit.errors import AdaptkitError
from adaptkit.merge.chat_templates import TEMPLATES
from adaptkit.merge.engine import run_merge
from builders import state, tiny_llama_config

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
CHATML = ["<|im_start|>", "<|im_end|>"]
OWN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def make_tokenizer(added: list[str], template: str | None = None, size: int = 64):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, size)]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(dict(zip(tokens, range(size))), [])),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added)
    tok.chat_template = template
    return tok


def save_llama(folder, rows: int, seed: int) -> None:
    """A 2-layer Llama's config and random weights (written directly: no model class to import)."""
    from safetensors.torch import save_file

    config = tiny_llama_config(vocab_size=rows, intermediate_size=48, architectures=["LlamaForCausalLM"])
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (rows, 32), "model.norm.weight": (32,), "lm_head.weight": (rows, 32)}
    for i in range(2):
        for part, shape in [("input_layernorm", (32,)), ("post_attention_layernorm", (32,)),
                            ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)), ("self_attn.v_proj", (16, 32)),
                            ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (48, 32)), ("mlp.up_proj", (48, 32)),
                            ("mlp.down_proj", (32, 48))]:
            shapes[f"model.layers.{i}.{part}.weight"] = shape
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({k: torch.randn(shape, generator=g) for k, shape in shapes.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    for seed, (name, rows, added, template, size) in enumerate([
            ("base", 64, [], None, 64), ("padded", 64, [f"<UNUSED_{i}>" for i in range(4)], None, 64),
            ("chatml", 66, CHATML, OWN_TEMPLATE, 64), ("chatml_b", 66, CHATML, OWN_TEMPLATE, 64),
            ("plain", 66, CHATML, None, 64), ("bare", 66, None, None, 64), ("wide", 65, [], None, 65),
            ("tools", 67, ["<tool>", "<call>"], None, 65)]):
        save_llama(root / name, rows, seed)
        if added is not None:
            make_tokenizer(added, template, size).save_pretrained(root / name)
    return root


def vocab(folder) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def recipe(zoo, models, method="linear", base="base", **extra):
    out = {"merge_method": method, "dtype": "float32", "base_model": str(zoo / base), "parameters": {"weight": 1.0},
           "models": [{"model": str(zoo / m)} for m in models]}
    if method == "slerp":
        out["models"], out["parameters"] = [{"model": str(zoo / m)} for m in models], {"t": 0.4}
    return {**out, **extra}


def mergekit_merge(given: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    given = dict(given)
    if str(given.get("tokenizer_source", "")).startswith("model:"):  # adaptkit's explicit spelling
        given["tokenizer_source"] = given["tokenizer_source"].removeprefix("model:")
    mk_run(MergeConfiguration.model_validate(given), str(out),
           MergeOptions(write_model_card=False, quiet=True, lazy_unpickle=False))


def both(zoo, tmp_path, given: dict):
    run_merge(given, tmp_path / "ours", progress=False)
    mergekit_merge(given, tmp_path / "mk")
    return tmp_path / "ours", tmp_path / "mk"


def assert_same_model(ours, mk):
    """The same vocabulary (token -> id), every tensor byte for byte, the same config.json vocab_size."""
    assert vocab(ours) == vocab(mk)
    got, expected = state(ours), state(mk)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    config = [json.loads((f / "config.json").read_text())["vocab_size"] for f in (ours, mk)]
    assert config[0] == config[1] == got["model.embed_tokens.weight"].shape[0]


CASES = {
    "source_base": (["base", "padded", "chatml"], "linear", {"tokenizer_source": "base"}),
    "source_union": (["base", "padded", "chatml"], "linear", {"tokenizer_source": "union"}),
    "source_model": (["base", "padded", "chatml"], "linear", {"tokenizer_source": "model:{chatml}"}),
    "union_plain_token": (["base", "wide", "chatml"], "linear", {"tokenizer_source": "union"}),
    "union_slerp": (["base", "chatml"], "slerp", {"tokenizer_source": "union"}),
    # the base lacks the ChatML tokens, two models have them: their mean fills the base's rows
    "union_mean_task_arithmetic": (["chatml", "chatml_b"], "task_arithmetic", {"tokenizer_source": "union"}),
    "block_forced_tokens_padded": (["base", "chatml"], "linear", {"tokenizer": {
        "source": "union", "pad_to_multiple_of": 16, "tokens": {
            "_tok_10": {"source": "{chatml}", "force": True}, "_tok_11": {"source": "{base}", "force": True},
            "<new_zero>": {"source": {"kind": "zero"}},
            "<renamed>": {"source": {"kind": "model_token", "model": "{chatml}", "token": "<|im_end|>"}},
            "_tok_20": {"source": {"kind": "model_token", "model": "{chatml}", "token_id": 64}, "force": True}}}}),
    "block_base_padded": (["chatml"], "linear", {"tokenizer": {"source": "base", "pad_to_multiple_of": 16}}),
    # model references written as mergekit's mappings ({model: {path, revision}}) wherever a model is named
    "source_model_mapping": (["base", "padded", "chatml"], "linear", {"tokenizer_source": {"model": {"path": "{chatml}"}}}),
    "block_mapping_sources": (["base", "chatml"], "linear", {"tokenizer": {
        "source": {"model": "{chatml}"}, "tokens": {"_tok_10": {"source": {"model": {"path": "{base}"}}, "force": True}}}}),
    # rows aligned (and means taken) in the compute dtype, as mergekit gathers its inputs
    "union_bf16": (["base", "padded", "chatml"], "linear", {"tokenizer_source": "union", "dtype": "bfloat16"}),
    "union_mean_bf16": (["chatml", "chatml_b"], "task_arithmetic", {"tokenizer_source": "union", "dtype": "bfloat16"}),
}


def fill(value, zoo):
    if isinstance(value, str):
        return value.format(**{n: zoo / n for n in ("base", "chatml", "chatml_b")})
    if isinstance(value, dict):
        return {fill(k, zoo): fill(v, zoo) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", CASES)
def test_tokenizer_settings_equal_mergekit(zoo, tmp_path, case):
    models, method, extra = CASES[case]
    base = "chatml" if case == "block_base_padded" else "base"
    ours, mk = both(zoo, tmp_path, recipe(zoo, models, method, base=base, **fill(extra, zoo)))
    assert_same_model(ours, mk)


def test_union_of_several_new_tokens(zoo, tmp_path):
    """chatml and tools each add tokens: mergekit numbers them in its set-of-models order, adaptkit in
    the recipe's (the base, then the models as listed); every token's rows agree."""
    ours, mk = both(zoo, tmp_path, recipe(zoo, ["base", "chatml", "tools"], tokenizer_source="union"))
    v_ours, v_mk = vocab(ours), vocab(mk)
    assert set(v_ours) == set(v_mk) and len(v_ours) == 69
    assert [t for t, _ in sorted(v_ours.items(), key=lambda item: item[1])][64:] == ["_tok_64", *CHATML, "<tool>", "<call>"]
    got, expected = state(ours), state(mk)
    for name in expected:
        if name not in VOCAB:
            assert torch.equal(got[name], expected[name]), name
            continue
        for tok, i in v_mk.items():
            assert torch.equal(got[name][v_ours[tok]], expected[name][i]), (name, tok)


def test_settings_win_over_truncation(zoo, tmp_path):
    """--unsafe-truncate-embeddings beside tokenizer settings: they align the rows (as mergekit's do), said
    in a warning; the output is the one without the option."""
    given = recipe(zoo, ["base", "tools"], tokenizer_source="union")
    with pytest.warns(UserWarning, match="the recipe's tokenizer settings align the token rows instead"):
        run_merge(given, tmp_path / "cut", progress=False, unsafe_truncate_embeddings=True)
    run_merge(given, tmp_path / "plain", progress=False)
    cut, plain = state(tmp_path / "cut"), state(tmp_path / "plain")
    assert sorted(cut) == sorted(plain) and all(torch.equal(cut[n], plain[n]) for n in plain)
    assert vocab(tmp_path / "cut") == vocab(tmp_path / "plain")


def test_union_rows_follow_the_rules(zoo, tmp_path):
    """Written out: a token only chatml has keeps chatml's row in every aligned input, so a linear
    merge of weights 1, 1 (normalized) gives that row; the base's own tokens merge as usual; unused
    tokens past padded's vocab_size are not in the output."""
    given = recipe(zoo, ["base", "chatml"], tokenizer_source="union")
    run_merge(given, tmp_path / "out", progress=False)
    out, v = state(tmp_path / "out"), vocab(tmp_path / "out")
    base, chatml = state(zoo / "base"), state(zoo / "chatml")
    for name in VOCAB:
        for tok in CHATML:
            torch.testing.assert_close(out[name][v[tok]], chatml[name][vocab(zoo / "chatml")[tok]])
        torch.testing.assert_close(out[name][v["_tok_5"]], (base[name][5] + chatml[name][5]) / 2)
    assert len(v) == 66 and not any(t.startswith("<UNUSED") for t in v)


def test_token_settings_rows_written_out(zoo, tmp_path):
    """Every input gets a forced or configured row, so a (normalized) linear merge returns it as is."""
    chatml_dir = str(zoo / "chatml")
    given = recipe(zoo, ["base", "chatml"], tokenizer={"tokens": {
        "_tok_10": {"source": chatml_dir, "force": True}, "<zero>": {"source": {"kind": "zero"}},
        "<renamed>": {"source": {"kind": "model_token", "model": chatml_dir, "token": "<|im_end|>"}},
        "_tok_20": {"source": {"kind": "model_token", "model": chatml_dir, "token_id": 64}, "force": True}}})
    run_merge(given, tmp_path / "out", progress=False)
    out, v, chatml = state(tmp_path / "out"), vocab(tmp_path / "out"), state(zoo / "chatml")
    for name in VOCAB:
        for tok, row in [("_tok_10", chatml[name][10]), ("<zero>", torch.zeros(32)), ("<renamed>", chatml[name][65]),
                         ("_tok_20", chatml[name][64])]:
            torch.testing.assert_close(out[name][v[tok]], row, msg=f"{name} {tok}")


def test_pad_rows_are_each_inputs_mean_row(zoo, tmp_path):
    given = recipe(zoo, ["chatml"], base="chatml", tokenizer={"source": "base", "pad_to_multiple_of": 16})
    run_merge(given, tmp_path / "out", progress=False)
    out, chatml = state(tmp_path / "out"), state(zoo / "chatml")
    assert out["lm_head.weight"].shape == (80, 32)
    torch.testing.assert_close(out["lm_head.weight"][66:], chatml["lm_head.weight"].mean(0).expand(14, 32))


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "{{ messages[0]['content'] }} <- literal jinja",
                                      "auto"], ids=["chatml", "llama3", "mistral", "literal", "auto"])
def test_chat_template_equals_mergekit(zoo, tmp_path, template):
    """No tokenizer settings: the donor's (the base's) tokenizer saved again with the template (`bare`
    has none, as in mergekit's test); the
    built-in ones render what mergekit's render; `auto` picks the template most inputs have."""
    from transformers import AutoTokenizer

    models = ["chatml", "chatml_b", "bare"] if template == "auto" else ["plain", "bare"]
    ours, mk = both(zoo, tmp_path, recipe(zoo, models, base="plain", chat_template=template))
    tok_ours, tok_mk = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(mk))
    assert tok_ours.get_vocab() == tok_mk.get_vocab()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    if template == "mistral":
        chat = chat[1:]
    for prompt in (False, True):
        assert (tok_ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
                == tok_mk.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt))
    assert template not in TEMPLATES or tok_ours.chat_template == TEMPLATES[template]


@pytest.mark.parametrize("name, chat, expected", [
    ("alpaca", [{"role": "system", "content": "Sys "}, {"role": "user", "content": "Q"}],
     "Sys\n\n### Instruction:\nQ\n\n### Response:\n"),
    ("exaone", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}],
     "[|system|][|endofturn|]\n[|user|]Q\n[|assistant|]A[|endofturn|]\n[|user|]R\n[|assistant|]"),
], ids=["alpaca", "exaone"])
def test_templates_mergekit_renders_with_stray_whitespace(name, chat, expected):
    """mergekit's alpaca and exaone templates render stray indentation or lose the blank line before
    `### Response:`; ours render the formats as written out here."""
    tok = make_tokenizer([], TEMPLATES[name])
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected


def test_union_with_chat_template(zoo, tmp_path):
    given = recipe(zoo, ["base", "chatml"], tokenizer_source="union", chat_template="chatml")
    run_merge(given, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("chat_template", TEMPLATES["chatml"]) \
        == TEMPLATES["chatml"]
    assert vocab(tmp_path / "out")["<|im_end|>"] == 65


BAD = [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "give 'tokenizer_source' or a 'tokenizer' block, not both"),
    ({"tokenizer": {"sauce": "union"}}, "tokenizer: unknown key 'sauce'; did you mean 'source'?"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "nope"}}}}}, "tokenizer.tokens.<x>.source: a model, or a mapping"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "{base}", "token": "a",
                                                  "token_id": 1}}}}}, "give one of 'token' and 'token_id'"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "elsewhere"}}}}, "'elsewhere' is not one of the recipe's models"),
    ({"tokenizer": {"tokens": {"<x>": {"forse": True}}}}, "unknown key 'forse'; did you mean 'force'?"),
    ({"tokenizer": {"tokens": {"<x>": {}}}}, "tokenizer.tokens.<x>: "),
    ({"tokenizer": {"tokens": {"_tok_3": {"force": True}}}}, "tokenizer.tokens._tok_3: force needs a source"),
    ({"chat_template": "chatmll"}, "'chatmll' is neither a built-in template"),
    ({"chat_template": "chatml", "output": {"kind": "adapter"}}, "apply to model outputs, not adapters"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_settings_are_one_line(zoo, tmp_path, extra, message):
    with pytest.raises(AdaptkitError) as e:
        run_merge(recipe(zoo, ["base", "chatml"], **fill(extra, zoo)), tmp_path / "out", progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_without_transformers(zoo, tmp_path, monkeypatch):
    """The tensor plane needs no transformers; tokenizer settings do, and say which extra in one line."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    run_merge(recipe(zoo, ["base", "padded"]), tmp_path / "plain", progress=False)
    with pytest.raises(ModuleNotFoundError) as e:
        run_merge(recipe(zoo, ["base", "chatml"], tokenizer_source="union"), tmp_path / "out", progress=False)
    assert "pip install 'adaptkit[" in one_line(e.value)
