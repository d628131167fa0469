"""`adaptkit generate` / `adaptkit.generate`: text from a causal LM and its adapters, on a tiny Llama and
GPT-2 with a word-level tokenizer.

Greedy decoding is written out (argmax of the last position, appended, until EOS) and checked against
transformers' generate; an adapter's text equals its merge's (`adaptkit merge`), the check the command
is for; every adapter kind the live plane runs (LoRA, aLoRA, prompt tuning, P-tuning, prefix tuning)
generates PEFT's tokens, through the command and on the live model with and without the KV cache
(left-padded batches included). Sampling follows the seed and restores the process's random state.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import adaptkit as ak
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from builders import tiny_gpt2
from text_models import WORDS, bert_dir, llama_dir, save_tokenizer

N = 4  # virtual tokens
NEW = 6  # tokens generated
CAT = 4 + WORDS.index("cat")  # the id of "cat" (4 special tokens first)
CASES = {  # id -> PEFT config; each changes what the model generates
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "alora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                init_lora_weights=False, alora_invocation_tokens=[CAT]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
}
PROMPTS = ["one two three", "the cat sat on"]

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny tensors: see conftest
              pytest.mark.filterwarnings("ignore::UserWarning:peft.*"),  # PEFT's notes on the tiny configs
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def gpt2_dir(folder):
    """A tiny GPT-2 (Conv1D layers, learned positions) with the word-level tokenizer's special ids."""
    model = tiny_gpt2()
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 0
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Base folders (llama, gpt2), PEFT's adapter folders on each (arch-case), a second LoRA and the
    merge of the first into the llama (`adaptkit merge`)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("generate")
    env = {"root": root, "llama": llama_dir(root / "llama"), "gpt2": gpt2_dir(root / "gpt2"),
           "bert": bert_dir(root / "bert")}
    for arch in ("llama", "gpt2"):
        for seed, (case, config) in enumerate(CASES.items()):
            torch.manual_seed(seed)
            base = AutoModelForCausalLM.from_pretrained(env[arch])
            get_peft_model(base, config()).save_pretrained(root / f"{arch}-{case}")
            env[f"{arch}-{case}"] = root / f"{arch}-{case}"
    torch.manual_seed(99)
    get_peft_model(AutoModelForCausalLM.from_pretrained(env["llama"]), CASES["lora"]()).save_pretrained(root / "lora-b")
    env["lora-b"] = root / "lora-b"
    result = CliRunner().invoke(cli, ["merge", "--base", str(env["llama"]), "-m", str(env["llama-lora"]),
                                      "-o", str(root / "merged")])
    assert result.exit_code == 0, result.output
    env["merged"] = root / "merged"
    return env


@pytest.fixture(scope="module")
def base_texts(env) -> dict[str, list[str]]:
    return {arch: texts(run(env, arch)) for arch in ("llama", "gpt2")}


def texts(records) -> list[str]:
    return [r["text"] for r in records]


def run(env, model, adapters=(), **options):
    options.setdefault("max_new_tokens", NEW)
    return ak.generate(str(env.get(model, model)), PROMPTS, [str(env[a]) for a in adapters], progress=False, **options)


def tokenizer_of(folder):
    from adaptkit.train.models import load_tokenizer

    return load_tokenizer(folder)


def decoded(tokenizer, ids, out) -> dict:
    """As the library reports it: the whole text less the prompt's, and the count of new tokens."""
    prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    return {"text": tokenizer.decode(out[0], skip_special_tokens=True)[len(prompt):],
            "new_tokens": out.shape[1] - ids.shape[1]}


def greedy_by_hand(model, ids, eos: int, steps: int = NEW):
    """Greedy decoding written out: the whole sequence each step, argmax of the last position, until EOS."""
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)
            if token.item() == eos:
                break
    return ids


def expected(folder, adapter=None, *, by_hand: bool = False) -> list[dict]:
    """The reference per prompt: transformers' (PEFT's, with an adapter) generate, or greedy by hand."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if adapter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, adapter).eval()
    found = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if by_hand:
            out = greedy_by_hand(model, ids, tokenizer.eos_token_id)
        else:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
        found.append(decoded(tokenizer, ids, out))
    return found


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_is_argmax_by_hand_and_transformers(env, arch):
    records = run(env, arch)
    assert [{"text": r["text"], "new_tokens": r["new_tokens"]} for r in records] == expected(env[arch]) \
        == expected(env[arch], by_hand=True)
    assert all(r["model"] == str(env[arch]) and r["adapters"] == [] for r in records)
    assert max(r["new_tokens"] for r in records) == NEW


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_adapter_kind_generates_peft_s_text(env, base_texts, arch, case):
    adapter = env[f"{arch}-{case}"]
    records = run(env, arch, [f"{arch}-{case}"])
    reference = expected(env[arch], adapter)
    assert [{"text": r["text"], "new_tokens": r["new_tokens"]} for r in records] == reference
    assert texts(records) != base_texts[arch], "the adapter must change the text for this test to mean anything"
    if case in ("lora", "prefix"):  # MODEL may be the adapter folder itself: its base is read from it
        assert texts(ak.generate(str(adapter), PROMPTS, max_new_tokens=NEW, progress=False)) == texts(records)


@pytest.mark.parametrize("case", ["prompt", "ptuning", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_learning_live_generate_with_and_without_cache(env, arch, case):
    """The live model's own generate on a left-padded batch: PEFT's tokens and logits, the cached path
    (virtual tokens put into the cache once) and the uncached one (the whole sequence every step)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(env[arch]).eval()
    ids = torch.tensor([[2, 5, 9, 7, 16, 11], [0, 0, 2, 7, 16, 11]])
    options = dict(attention_mask=(ids != 0).long(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), env[f"{arch}-{case}"]).eval()
        with torch.no_grad():
            reference = peft.generate(input_ids=ids, **options)
    model = copy.deepcopy(base)
    ak.load_adapter(model, env[f"{arch}-{case}"])
    for use_cache in (True, False):
        with torch.no_grad():
            found = model.generate(input_ids=ids, use_cache=use_cache, **options)
        assert torch.equal(found.sequences, reference.sequences), use_cache
        for mine, theirs in zip(found.logits, reference.logits):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_adapter_equals_its_merge(env, base_texts):
    """The check `generate` is for: the base with the adapter says what the merged model says."""
    with_adapter = run(env, "llama", ["llama-lora"])
    assert texts(with_adapter) == texts(run(env, "merged"))
    assert texts(with_adapter) != base_texts["llama"]


def test_compare_prints_each_run_one_under_the_other(env, base_texts):
    args = ["generate", str(env["llama"]), "--adapter", str(env["llama-lora"]), "--adapter", str(env["lora-b"]),
            "-m", str(env["merged"]), "--compare", "--max-new-tokens", str(NEW)]
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    result = CliRunner().invoke(cli, ["-q", *args, *prompts, "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    a, b, llama, merged = (str(env[k]) for k in ("llama-lora", "lora-b", "llama", "merged"))
    runs = [(llama, []), (llama, [a]), (llama, [b]), (llama, [a, b]), (merged, [])]
    assert [(r["model"], r["adapters"], r["prompt"]) for r in records] == [(m, x, p) for m, x in runs for p in PROMPTS]
    assert set(records[0]) == {"model", "adapters", "prompt", "text", "new_tokens"}
    # each run as if alone: the adapters loaded beside it change nothing
    by_run = [texts(records[i:i + len(PROMPTS)]) for i in range(0, len(records), len(PROMPTS))]
    assert by_run[0] == base_texts["llama"] and by_run[1] == texts(run(env, "llama", ["llama-lora"]))
    assert by_run[3] == texts(run(env, "llama", ["llama-lora", "lora-b"])) and by_run[4] == by_run[1]
    assert len({tuple(t) for t in by_run}) >= 3
    text = CliRunner().invoke(cli, ["-q", *args, *prompts])
    headers = [line for line in text.output.splitlines() if line.startswith("== ")]
    assert text.exit_code == 0 and len(headers) == len(records), text.output
    assert headers[0].startswith(f"== {llama}  (") and headers[3].startswith(f"== {llama} + {a}  (")
    assert f"{PROMPTS[0]}{records[0]['text']}" in text.output


def test_sampling_is_seeded_and_leaves_the_random_state(env):
    """Sampling written out: softmax(logits / T), one torch.multinomial draw per step from the seed."""
    from transformers import AutoModelForCausalLM

    state = torch.get_rng_state()
    records = run(env, "llama", temperature=0.7, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert texts(records) == texts(run(env, "llama", temperature=0.7, seed=5))
    tokenizer, model = tokenizer_of(env["llama"]), AutoModelForCausalLM.from_pretrained(env["llama"]).eval()
    for prompt, record in zip(PROMPTS, records):
        ids = start = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(5)
        with torch.no_grad():
            for _ in range(NEW):
                probs = torch.softmax(model(input_ids=ids).logits[:, -1] / 0.7, -1)
                ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
                if ids[0, -1].item() == tokenizer.eos_token_id:
                    break
        assert decoded(tokenizer, start, ids)["text"] == record["text"]
    seeds = {tuple(texts(run(env, "llama", temperature=1.5, seed=s))) for s in range(4)}
    assert len(seeds) > 1


def test_prompt_file_and_chat_template(env, base_texts, tmp_path):
    import shutil

    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    result = CliRunner().invoke(cli, ["-q", "generate", str(env["llama"]), "--prompt-file",
                                      str(tmp_path / "prompts.txt"), "--max-new-tokens", str(NEW), "--json"])
    assert result.exit_code == 0, result.output
    assert texts(json.loads(result.output)) == base_texts["llama"]
    # --chat: the prompt as a user turn in the template, then generated as that text
    shutil.copytree(env["llama"], tmp_path / "chat")
    config = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
    config["chat_template"] = ("<s>{% for m in messages %} {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} sat{% endif %}")
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ak.generate(str(tmp_path / "chat"), PROMPTS, max_new_tokens=NEW, chat=True, progress=False)
    plain = ak.generate(str(tmp_path / "chat"), [f"{p} sat" for p in PROMPTS], max_new_tokens=NEW, progress=False)
    assert [r["new_tokens"] for r in chat] == [r["new_tokens"] for r in plain]
    assert [r["text"].split() for r in chat] == [r["text"].split() for r in plain]


@pytest.mark.parametrize("argv, message", [
    (["{bert}", "--prompt", "x"], "not a causal language model (architectures: BertModel)"),
    (["minilm", "--prompt", "x"], "minilm: not a causal language model"),
    (["{root}/nothing", "--prompt", "x"], "nothing: no such folder"),
    (["{llama}", "--prompt", "x", "--temperature", "-1"], "'--temperature': -1.0 is not in the range"),
    (["{llama}", "--prompt", "x", "--temperature", "nan"], "'--temperature': 'nan' is not a finite number"),
    (["{llama}", "--prompt", "x", "--top-p", "0", "--temperature", "1"], "'--top-p': 0.0 is not in the range"),
    (["{llama}", "--prompt", "x", "--top-p", "0.9"], "only apply when sampling: give a temperature > 0"),
    (["{llama}", "--prompt", "x", "--max-new-tokens", "0"], "'--max-new-tokens': 0 is not in the range"),
    (["{llama}"], "give a prompt: --prompt TEXT"),
    (["{llama}", "--prompt-file", "{root}/none.txt"], "none.txt: no such prompt file"),
    (["{llama}", "--prompt-file", "{root}/empty.txt"], "empty.txt: no prompts (one per line)"),
    (["{llama}", "--prompt", "x", "--chat"], "tokenizer has no chat template"),
    (["{llama}", "--prompt", "x", "--adapter", "{root}/nothing"], "nothing: no such"),
    (["{llama}", "--prompt", "x", "--adapter", "{lora}", "--adapter", "{lora}/"], "is given twice"),
], ids=["encoder", "minilm", "missing", "negative-temperature", "nan-temperature", "top-p-zero", "top-p-greedy",
        "no-new-tokens", "no-prompt", "missing-prompt-file", "empty-prompt-file", "no-chat-template",
        "missing-adapter", "adapter-twice"])
def test_bad_input_is_one_line(env, argv, message):
    (env["root"] / "empty.txt").write_text("\n  \n")
    args = [a.format(bert=env["bert"], llama=env["llama"], root=env["root"], lora=env["llama-lora"]) for a in argv]
    result = CliRunner().invoke(cli, ["-q", "generate", *args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"top_p": 1.5, "temperature": 1.0}, "top_p must be in"),
    ({"top_k": -1, "temperature": 1.0}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
], ids=["inf-temperature", "top-p", "top-k", "max-new-tokens"])
def test_library_refuses_bad_settings_before_loading(env, options, message):
    with pytest.raises(AdaptkitError, match=message):
        ak.generate(str(env["root"] / "nothing"), "x", progress=False, **options)
