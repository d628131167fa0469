"""LoRA's `trainable_token_indices` (PEFT): a LoRA on some layers and trainable tokens on the embedding, one adapter.

On the LoRA's layers ΔW = s·B·A; on the embedding the rows of the chosen ids are replaced,
E'[t] = T[j] for t = ids[j], E'[t] = E[t] otherwise; a head tied to the embedding reads the same rows
(its logits for those tokens are h·T[j]ᵀ). Both are written out below on the merged weights. PEFT writes
(list and dict forms, untied and tied heads) and adaptkit loads with PEFT's logits and merges into the
saved base as PEFT's merge_and_unload; adaptkit writes and PEFT loads with equal logits; training moves
only T's rows and the LoRA; what PEFT refuses or adaptkit does not run is one line naming the field.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import state, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

IDS = torch.tensor([[1, 3, 5, 9, 7, 2, 60], [5, 60, 3, 0, 7, 11, 4]])
TOKENS = [3, 60, 7]
EMBED, KEY = "model.embed_tokens", "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
# (id, tied head, trainable_token_indices as PEFT's config takes it)
CASES = [
    ("list", False, TOKENS),
    ("dict", False, {"embed_tokens": TOKENS}),
    ("tied", True, TOKENS),
]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def peft_lora(tied: bool, indices, seed: int = 1):
    """PEFT's LoRA on q_proj and v_proj with trainable tokens, every tensor non-trivial (T drawn at random)."""
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False,
                        trainable_token_indices=indices)
    model = get_peft_model(tiny_llama(tie_word_embeddings=tied), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def made(request, tmp_path_factory):
    """PEFT's folder, the saved base, PEFT's logits and merged state dict, T and the LoRA's factors."""
    _, tied, indices = request.param
    folder = tmp_path_factory.mktemp(request.param[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_lora(tied, indices)
        model.save_pretrained(folder / "peft")
        tiny_llama(tie_word_embeddings=tied).save_pretrained(folder / "base")
        stored = load_file(folder / "peft" / "adapter_model.safetensors")
        expected = logits(model)
        merged = copy.deepcopy(model).merge_and_unload().state_dict()
    return dict(tied=tied, folder=folder, stored=stored, expected=expected, merged=merged)


def test_peft_saves_the_rows_once_under_the_embedding(made):
    keys = [k for k in made["stored"] if "token_adapter" in k]
    assert keys == [KEY] and made["stored"][KEY].shape == (len(TOKENS), 32)


def test_loads_with_peft_logits(made):
    model = tiny_llama(tie_word_embeddings=made["tied"])
    ak.load_adapter(model, made["folder"] / "peft")
    assert rel(logits(model), made["expected"]) < 1e-5


def test_merge_into_the_base_equals_merge_and_unload_and_the_formulas(made, tmp_path):
    run_merge({"merge_method": "task_arithmetic", "base_model": str(made["folder"] / "base"),
               "models": [{"model": str(made["folder"] / "peft"), "parameters": {"weight": 1.0}}]},
              tmp_path / "out", progress=False)
    out, base = state(tmp_path / "out"), state(made["folder"] / "base")
    for name, tensor in out.items():
        want = made["merged"][name]
        assert rel(tensor, want) < 1e-5 if tensor.norm() > 0 else torch.equal(tensor, want), name
    # the formulas written out: E' rows at the ids are T, the others E; W' = W + (α/r)·B·A
    table, rows = base[f"{EMBED}.weight"], made["stored"][KEY]
    expected = table.clone()
    expected[TOKENS] = rows
    torch.testing.assert_close(out[f"{EMBED}.weight"], expected, atol=1e-6, rtol=0)
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = made["stored"][f"{prefix}.lora_A.weight"], made["stored"][f"{prefix}.lora_B.weight"]
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(out[name], base[name] + 8 / 4 * b @ a, atol=1e-6, rtol=1e-5)


def test_tied_head_reads_the_same_rows():
    """Logits of the chosen tokens are h·T[j]ᵀ, of the others h·E[t]ᵀ (tie_word_embeddings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_llama(tie_word_embeddings=True)
        handle = ak.inject(model, "lora", target_modules=["q_proj"], r=2, trainable_token_indices=TOKENS)
    with torch.no_grad():
        model.model.embed_tokens.branches["default"].params["trainable_tokens_delta"].normal_()
    rows = model.model.embed_tokens.branches["default"].params["trainable_tokens_delta"].detach().clone()
    table = model.model.embed_tokens.base_layer.weight.detach().clone()
    hidden = {}
    model.model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    got = logits(model)
    expected = hidden["h"] @ table.T
    expected[..., TOKENS] = hidden["h"] @ rows.T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    handle.merge()
    torch.testing.assert_close(logits(model), got, atol=1e-5, rtol=1e-5)
    handle.unmerge()
    torch.testing.assert_close(model.model.embed_tokens.base_layer.weight, table, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_adaptkit_writes_peft_loads(tied, tmp_path):
    torch.manual_seed(3)
    model = tiny_llama(tie_word_embeddings=tied)
    handle = ak.inject(model, "lora", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                       init_lora_weights=False, trainable_token_indices=TOKENS)
    with torch.no_grad():
        model.model.embed_tokens.branches["default"].params["trainable_tokens_delta"].normal_()
    ours = logits(model)
    handle.save(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {EMBED: TOKENS}
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert [k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors") if "token" in k] == [KEY]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / "ours").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]  # none missing or unexpected, no unknown field
    assert rel(logits(peft), ours) < 1e-5
    again = tiny_llama(tie_word_embeddings=tied)
    ak.load_adapter(again, tmp_path / "ours")
    assert rel(logits(again), ours) < 1e-6


def test_training_moves_only_the_chosen_rows_and_the_lora():
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=True)
    ak.inject(model, "lora", target_modules=["q_proj"], r=2, trainable_token_indices=TOKENS)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n.rsplit(".", 1)[-1] for n in trained) == ["lora_A", "lora_A", "lora_B", "lora_B",
                                                             "trainable_tokens_delta"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(IDS).logits.square().mean().backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trained)
    assert all(not torch.equal(before[n], after[n]) for n in trained if "lora_A" not in n)  # B starts at 0


@pytest.mark.parametrize("row", [
    ("same_layer", dict(target_modules=["q_proj", "embed_tokens"]), "trainable_token_indices"),
    ("repeated_id", dict(target_modules=["q_proj"], trainable_token_indices=[3, 3]), "trainable_token_indices"),
    ("id_beyond_vocab", dict(target_modules=["q_proj"], trainable_token_indices=[3, 128]), "trainable_token_indices"),
    ("unknown_layer", dict(target_modules=["q_proj"], trainable_token_indices={"nowhere": [3]}), "nowhere"),
    ("lora_on_tied_head", dict(target_modules=["q_proj", "lm_head"], tied=True), "trainable_token_indices"),
    ("tied_pair_named", dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3],
                                                                              "lm_head": [4]}, tied=True), "embedding"),
], ids=lambda r: r[0])
def test_inject_refusals(row):
    _, kwargs, said = row
    kwargs = {"trainable_token_indices": TOKENS, **kwargs}
    with pytest.raises(AdaptkitError) as error:
        ak.inject(tiny_llama(tie_word_embeddings=kwargs.pop("tied", False)), "lora", r=2, **kwargs)
    assert said in str(error.value) and "\n" not in str(error.value)


def edit(folder, out, config=None, tensors=None):
    """A copy of the PEFT folder with config fields and tensors changed."""
    from safetensors.torch import save_file

    out.mkdir()
    cfg = {**json.loads((folder / "adapter_config.json").read_text()), **(config or {})}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({**load_file(folder / "adapter_model.safetensors"), **(tensors or {})}, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize("row", [
    ("adalora", dict(peft_type="ADALORA"), None, "trainable_token_indices"),
    ("rows_count", None, {KEY: torch.zeros(2, 32)}, "trainable_token_indices"),
    ("dict_misses_layer", dict(trainable_token_indices={"lm_head": TOKENS}), None, "trainable_token_indices"),
], ids=lambda r: r[0])
def test_file_refusals(row, made, tmp_path):
    _, config, tensors, said = row
    if made["tied"]:
        pytest.skip("one base is enough")
    folder = edit(made["folder"] / "peft", tmp_path / "edited", config, tensors)
    with pytest.raises(AdaptkitError) as error:
        ak.load_adapter(tiny_llama(), folder)
    assert said in str(error.value) and "\n" not in str(error.value)


def test_hot_swap_is_refused(made):
    if made["tied"]:
        pytest.skip("one base is enough")
    model = tiny_llama()
    ak.load_adapter(model, made["folder"] / "peft")
    with pytest.raises(AdaptkitError, match="trainable_token_indices"):
        ak.load_adapter(model, made["folder"] / "peft", swap=True)


def test_delta_lora_refuses_the_field():
    with pytest.raises(AdaptkitError, match="delta_lora: trainable_token_indices"):
        ak.inject(tiny_llama(), "delta_lora", target_modules=["q_proj"], trainable_token_indices=TOKENS)


def test_converts_to_a_plain_lora_by_svd_with_the_base(made, tmp_path):
    """ΔE has rank ≤ len(ids): at rank 4 the SVD is exact, and the plain LoRA (embedding LoRA in place of the
    tokens) gives PEFT's logits. With a tied head it is refused: an embedding LoRA leaves the head as it is."""
    from adaptkit.files.convert import convert

    if made["tied"]:
        with pytest.raises(AdaptkitError, match="ties this embedding to its output head"):
            convert(made["folder"] / "peft", "peft", tmp_path / "plain", rank=4, base=made["folder"] / "base")
        return

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 4 is above ΔE's rank 3: clamped
        report = convert(made["folder"] / "peft", "peft", tmp_path / "plain", rank=4, base=made["folder"] / "base")
    assert report["max_error"] < 1e-5 and report["modules"][EMBED]["rank"] == len(TOKENS)
    stored = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert stored[f"base_model.model.{EMBED}.lora_embedding_A"].shape == (len(TOKENS), 128)  # an embedding LoRA
    model = tiny_llama()
    ak.load_adapter(model, tmp_path / "plain")
    assert rel(logits(model), made["expected"]) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    assert rel(logits(peft), made["expected"]) < 1e-4


def test_adaptkit_train_learns_the_rows_and_peft_loads_the_result(tmp_path, one_thread):
    """`adaptkit train` with the field: the loss falls, the chosen rows of E are trained, PEFT loads the folder."""
    from adaptkit.train.loop import train
    from text_models import counting, llama_dir, write_jsonl

    base = llama_dir(tmp_path / "llama")
    data = write_jsonl(tmp_path / "counting.jsonl", counting())
    chosen = list(range(4, 24))
    train(base, "lora", data, tmp_path / "out", settings=dict(r=4, lora_alpha=8, trainable_token_indices=chosen),
          lr=1e-1, max_steps=8, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.05, losses
    rows = load_file(tmp_path / "out" / "adapter_model.safetensors")[KEY]
    table = state(base)[f"{EMBED}.weight"]
    assert rows.shape == (len(chosen), 32) and not torch.allclose(rows, table[chosen])
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 1, 12, 4, 19]])  # within the toy vocabulary
    ours = AutoModelForCausalLM.from_pretrained(base).eval()
    ak.load_adapter(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out").eval()
    assert rel(logits(peft, ids), logits(ours, ids)) < 1e-5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_trainable_tokens_convert_to_an_embedding_lora(tied, tmp_path):
    """PEFT's TrainableTokensConfig too: ΔE by SVD is an embedding LoRA (was written as lora_A/lora_B, which PEFT
    ignored: 0.73 relative off), and a tied base is refused."""
    from peft import TrainableTokensConfig

    from adaptkit.files.convert import convert

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(tie_word_embeddings=tied), TrainableTokensConfig(token_indices=TOKENS,
                                                                                           init_weights=False))
        model.save_pretrained(tmp_path / "peft")
        tiny_llama(tie_word_embeddings=tied).save_pretrained(tmp_path / "base")
    expected = logits(model)
    if tied:
        with pytest.raises(AdaptkitError, match="ties this embedding to its output head"):
            convert(tmp_path / "peft", "peft", tmp_path / "plain", rank=3, base=tmp_path / "base")
        return
    assert convert(tmp_path / "peft", "peft", tmp_path / "plain", rank=3, base=tmp_path / "base")["max_error"] < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    assert rel(logits(peft), expected) < 1e-5
