"""`adaptkit train --report-to`: the metrics of metrics.jsonl, read back through TensorBoard's and
W&B's own readers at the steps they were written; bad names and missing libraries in one line."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.train.reporting import parse_report_to, scalars
from text_models import bert_dir, sentiment, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return {"bert": bert_dir(root / "bert"), "data": write_jsonl(root / "s.jsonl", sentiment())}


def train_args(env, out, *extra) -> list[str]:
    return ["-q", "train", "--base", str(env["bert"]), "--variant", "lora", "--set", "r=4", "--data", str(env["data"]),
            "--eval", str(env["data"]), "--eval-every", "2", "--max-steps", "3", "--lr", "5e-2", "-o", str(out), *extra]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_file_holds_the_metrics_at_their_steps(env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, train_args(env, out, "--report-to", "tensorboard", "--run-name", "r4"))
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "runs" / "r4"))
    events.Reload()
    written = metrics(out)
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in written], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([m["lr"] for m in written], rel=1e-6)
    evals = events.Scalars("eval/loss")
    assert [e.step for e in evals] == [2, 3]
    assert [e.value for e in evals] == pytest.approx([m["eval_loss"] for m in written if "eval_loss" in m], rel=1e-6)
    assert "eval/accuracy" in events.Tags()["scalars"] and "train/step" not in events.Tags()["scalars"]
    assert not list(tmp_path.glob(".*"))  # the run folder was renamed into place, nothing beside OUT


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file, read with wandb's own message types. The
    file is LevelDB's log format after a 7-byte W&B header (wandb 0.31 has no Python reader left):
    32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_history(env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "adaptkit-test")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, train_args(env, out, "--report-to", "wandb"))
    assert result.exit_code == 0, result.output
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, runs = {}, []
    for record in wandb_records(files[0]):
        if record.WhichOneof("record_type") == "run":
            runs.append(record.run)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
    assert [(r.display_name, r.project) for r in runs] == [("out", "adaptkit-test")]
    written = metrics(out)
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx([m["loss"] for m in written], rel=1e-12)
    assert history[3]["eval/accuracy"] == written[-1]["eval_accuracy"] and "eval/loss" not in history[1]


@pytest.mark.parametrize("given, expected", [
    ((), []),
    (("tensorboard",), ["tensorboard"]),
    (("wandb,tensorboard",), ["wandb", "tensorboard"]),
    (("tensorboard", "TensorBoard, wandb"), ["tensorboard", "wandb"]),
], ids=["none", "one", "comma-list", "repeated-and-mixed"])
def test_parse_report_to(given, expected):
    assert parse_report_to(given) == expected


def test_scalars_name_train_and_eval_metrics():
    record = {"step": 4, "epoch": 0.5, "loss": 1.25, "lr": 1e-3, "eval_loss": 0.75, "eval_accuracy": 1.0, "elapsed": 2.0}
    assert scalars(record) == {"train/epoch": 0.5, "train/loss": 1.25, "train/lr": 1e-3, "eval/loss": 0.75,
                               "eval/accuracy": 1.0, "train/elapsed": 2.0}


@pytest.mark.parametrize("extra, hidden, message", [
    (("--report-to", "mlflow"), None, "unknown --report-to 'mlflow' (known: tensorboard, wandb)"),
    (("--report-to", "wandb"), "wandb", "--report-to wandb needs the wandb library: pip install 'adaptkit[report]'"),
    (("--report-to", "tensorboard"), "tensorboard",
     "--report-to tensorboard needs the tensorboard library: pip install 'adaptkit[report]'"),
    (("--report-to", "tensorboard", "--run-name", "../x"), None, "--run-name names a folder under OUT/runs/"),
], ids=["unknown", "no-wandb", "no-tensorboard", "run-name-path"])
def test_bad_report_to_is_one_line_and_writes_nothing(env, tmp_path, monkeypatch, extra, hidden, message):
    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` raises ImportError
    result = CliRunner().invoke(cli, train_args(env, tmp_path / "out", *extra))
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AdaptkitError):
        parse_report_to(["tensorboard", "wandb", "csv"])
