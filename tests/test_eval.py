"""Evaluation against a direct computation, and soups scored on evaluation data end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import adaptkit as ak
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.train.evaluation import evaluate
from adaptkit.train.models import load_tokenizer
from adaptkit.train.loop import train
from text_models import bert_dir, counting, llama_dir, save_tokenizer, sentiment, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"root": root, "llama": llama_dir(root / "llama"), "bert": bert_dir(root / "bert")}


def test_causal_lm_eval_equals_direct_computation(env, tmp_path):
    from transformers import AutoModelForCausalLM

    records = counting(5) + [{"prompt": "red cat", "completion": "sat on the mat"}, {"prompt": "one", "completion": "two"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    train(env["llama"], "lora", data, tmp_path / "a", settings=dict(r=4), lr=3e-2, max_steps=3, progress=False)
    result = evaluate(env["llama"], data, adapters=[tmp_path / "a"], batch_size=3, progress=False)

    tok = load_tokenizer(env["llama"])
    model = AutoModelForCausalLM.from_pretrained(env["llama"])
    ak.load_adapter(model, tmp_path / "a")
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:  # one example at a time, no padding: HF's mean loss × the tokens it predicts
            if "text" in r:
                ids = tok(r["text"])["input_ids"]
                labels = list(ids)
            else:
                head = tok(r["prompt"])["input_ids"]
                tail = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids, labels = head + tail, [-100] * len(head) + tail
            n = sum(1 for x in labels[1:] if x != -100)
            total += model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            count += n
    assert result["task"] == "causal-lm" and result["tokens"] == count and result["examples"] == len(records)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_classification_eval_uses_the_trained_label_mapping(env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train(env["bert"], "lora", write_jsonl(tmp_path / "t.jsonl", sentiment()), tmp_path / "a", settings=dict(r=4),
          lr=5e-2, max_steps=6, progress=False)
    records = [{"text": "bad film", "label": "neg"}, {"text": "good cat", "label": "pos"},  # neg first: order differs
               {"text": "the mat good", "label": "neg"}, {"text": "bad", "label": "pos"}, {"text": "good", "label": "pos"}]
    data = write_jsonl(tmp_path / "e.jsonl", records)
    result = evaluate(tmp_path / "a", data, batch_size=2, progress=False)

    tok = load_tokenizer(env["bert"])
    model = AutoModelForSequenceClassification.from_pretrained(env["bert"], num_labels=2).eval()
    ak.load_adapter(model, tmp_path / "a")
    mapping = {"pos": 0, "neg": 1}  # the training data's first-seen order
    losses, hits = [], 0
    with torch.no_grad():
        for r in records:
            logits = model(**tok(r["text"], return_tensors="pt")).logits[0]
            losses.append(F.cross_entropy(logits[None], torch.tensor([mapping[r["label"]]])).item())
            hits += int(logits.argmax()) == mapping[r["label"]]
    assert result["task"] == "classification" and result["examples"] == 5
    assert result["loss"] == pytest.approx(sum(losses) / 5, rel=1e-5)
    assert result["accuracy"] == hits / 5

    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "good", "label": "pos"}, {"text": "x", "label": "meh"}])
    with pytest.raises(AdaptkitError, match=r"b\.jsonl:2: label 'meh' is not one of the trained labels"):
        evaluate(tmp_path / "a", bad, progress=False)


@pytest.fixture(scope="module")
def candidates(env, tmp_path_factory):
    """Three full tiny Llamas (with tokenizer): the base and two noisy copies, one much noisier."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("soup")
    folders = []
    for i, noise in enumerate([0.0, 0.02, 0.5]):
        model = AutoModelForCausalLM.from_pretrained(env["llama"])
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        model.save_pretrained(root / f"c{i}")
        save_tokenizer(root / f"c{i}")
        folders.append(root / f"c{i}")
    return folders


def test_soup_greedy_and_sweep_with_eval_data(candidates, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", counting(6))
    runner = CliRunner()
    args = ["-q", "soup", "greedy", *[x for c in candidates for x in ("-m", str(c))], "--eval", str(data),
            "-o", str(tmp_path / "soup"), "--json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for c in candidates:  # each candidate scored by −loss on the data
        assert report["scores"][str(c)] == pytest.approx(-evaluate(c, data, progress=False)["loss"], rel=1e-6)
    assert report["score"] == pytest.approx(-evaluate(tmp_path / "soup", data, progress=False)["loss"], rel=1e-6)
    assert str(candidates[2]) not in report["ingredients"]  # the noisy one makes the soup worse

    result = runner.invoke(cli, ["-q", "soup", "sweep", str(candidates[0]), str(candidates[2]), "--alphas", "0,1",
                                 "--eval", str(data), "-o", str(tmp_path / "best"), "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)
    assert sweep["scores"]["0.0"] == pytest.approx(report["scores"][str(candidates[0])], rel=1e-6)
    assert sweep["scores"]["1.0"] == pytest.approx(report["scores"][str(candidates[2])], rel=1e-6)

    both = runner.invoke(cli, ["soup", "greedy", "-m", str(candidates[0]), "--eval", str(data), "--eval-cmd", "x",
                               "-o", str(tmp_path / "x")])
    assert both.exit_code == 1 and "exactly one of --eval" in both.output
