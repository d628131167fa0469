"""Pictures (adaptkit/plots/): each written by its command on tiny inputs and read back (size sensible, not
blank), each figure checked on hand-written data where its marks must fall, the spectrum's numbers against
the formula and against PEFT's ΔW, and the failures (bad suffix, no matplotlib, a picture of nothing)
said in one line before any work, leaving no file behind."""
from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptkit import plots
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.plots.pictures import _moving_average
from builders import tiny_llama
from text_models import bert_dir, sentiment, write_jsonl

pytest.importorskip("matplotlib")
MODULES = ["q_proj", "v_proj"]


def run(*args):
    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)])
    return result


def check_picture(path: Path, min_width: int = 500, min_height: int = 300) -> None:
    """A readable picture: PNG read back as pixels (sensible size, more than one colour, variance > 0), SVG
    parsed as XML (an <svg> of sensible size drawing paths and text)."""
    assert path.is_file()
    if path.suffix == ".png":
        from matplotlib.image import imread

        pixels = imread(path)
        height, width = pixels.shape[:2]
        assert width >= min_width and height >= min_height, (width, height)
        assert pixels.var() > 0
        assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}) > 10
    else:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
        assert float(root.get("width").removesuffix("pt")) >= min_width * 0.72
        assert float(root.get("height").removesuffix("pt")) >= min_height * 0.72
        assert len([e for e in root.iter() if e.tag.endswith("path")]) > 10
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# -- inputs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """One-tensor 'models' with known values; the score is minus the distance of the mean to 1.0."""
    root = tmp_path_factory.mktemp("ingredients")
    for name, v in {"good1": 1.2, "good2": 0.8, "meh": 1.6, "zero": 0.0, "bad": 5.0}.items():
        (root / name).mkdir()
        save_file({"w": torch.full((4, 4), v)}, root / name / "model.safetensors")
    return root


def score(folder) -> float:
    return -abs(load_file(f"{folder}/model.safetensors")["w"].mean().item() - 1.0)


def make_lora(folder: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, target_modules=MODULES, **config))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    tiny_llama().save_pretrained(root / "llama")
    make_lora(root / "lora1", 1, r=4, lora_alpha=8)
    make_lora(root / "lora2", 2, r=4, lora_alpha=8)
    make_lora(root / "dora", 3, r=4, lora_alpha=8, use_dora=True)
    return root


# -- each command draws its picture -------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_soup_sweep_draws_the_curve(ingredients, tmp_path, suffix):
    picture = tmp_path / f"sweep{suffix}"
    result = run("soup", "sweep", ingredients / "zero", ingredients / "bad", "--alphas", "0,0.1,0.2,0.5",
                 "--eval-py", "test_plots:score", "-o", tmp_path / "best", "--plot", picture, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["plot"] == str(picture)
    check_picture(picture)


def test_soup_greedy_draws_the_trials(ingredients, tmp_path):
    picture = tmp_path / "greedy.png"
    models = [a for n in ("bad", "meh", "good2", "good1") for a in ("-m", ingredients / n)]
    result = run("soup", "greedy", *models, "--eval-py", "test_plots:score", "-o", tmp_path / "soup", "--plot", picture)
    assert result.exit_code == 0, result.output
    assert f"picture: {picture}" in result.output
    check_picture(picture)


def test_inspect_draws_the_spectrum(models, tmp_path):
    picture = tmp_path / "spectrum.png"
    result = run("inspect", models / "lora1", "--plot", picture, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["plot"] == str(picture) and report["adapter"]["variant"] == "lora"
    check_picture(picture)
    dora = run("inspect", models / "dora", "--plot", tmp_path / "dora.png")
    assert dora.exit_code == 1 and "give the base model" in dora.output and len(dora.output.strip().splitlines()) == 1
    assert not (tmp_path / "dora.png").exists()
    dora = run("inspect", models / "dora", "--plot", tmp_path / "dora.svg", "--base", models / "llama")
    assert dora.exit_code == 0, dora.output
    check_picture(tmp_path / "dora.svg")


def test_quantize_draws_the_errors(models, tmp_path):
    picture = tmp_path / "error.png"
    method = "int8"
    result = run("quantize", models / "llama", "--method", method, "-o", tmp_path / "q", "--plot", picture, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["plot"] == str(picture) and report["tensors"]
    check_picture(picture)


def test_adapter_merge_draws_the_refactoring_errors(models, tmp_path):
    picture = tmp_path / "errors.png"
    result = run("merge", "-m", models / "lora1", "-m", models / "lora2", "--method", "linear", "--rank", "2",
                 "-o", tmp_path / "merged", "--plot", picture, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["plot"] == str(picture) and max(report["errors"].values()) > 0
    check_picture(picture)


@pytest.mark.parametrize("args, line", [
    (["--method", "concat"], "merges the adapters' factors exactly"),
    (["--base", "{llama}", "--method", "task_arithmetic"], "this merge writes a model"),
    (["--method", "linear", "--rank", "2", "--dry-run"], "--dry-run merges nothing"),
], ids=["exact merge", "model output", "dry run"])
def test_merge_without_errors_refuses_plot_before_work(models, tmp_path, args, line):
    args = [a.format(llama=models / "llama") for a in args]
    result = run("merge", "-m", models / "lora1", "-m", models / "lora2", *args, "-o", tmp_path / "out",
                 "--plot", tmp_path / "e.png")
    assert result.exit_code == 1 and line in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A classification LoRA trained 8 steps on a tiny BERT, evaluated every 4, drawn by train --plot."""
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "sentiment.jsonl", sentiment())
    result = run("train", "--base", bert_dir(root / "bert"), "--variant", "lora", "--set", "r=4", "--data", data,
                 "--eval", data, "--max-steps", "8", "--eval-every", "4", "-o", root / "out",
                 "--plot", root / "curves.png", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["plot"] == str(root / "curves.png")
    return root


def test_train_draws_its_curves(trained):
    check_picture(trained / "curves.png", min_width=1000)  # two panels: loss, evaluation accuracy


@pytest.mark.parametrize("source", ["out/metrics.jsonl", "out"], ids=["the log", "the training folder"])
def test_plot_command_draws_a_training_log(trained, tmp_path, source):
    picture = tmp_path / "curves.svg"
    result = run("plot", trained / source, "-o", picture, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"metrics": str(trained / source), "records": 8, "steps": 8,
                                         "plot": str(picture)}
    check_picture(picture, min_width=1000)


# -- what each figure marks ----------------------------------------------------------------------------
def test_sweep_marks_the_alpha_the_sweep_keeps():
    alphas, scores = [0.0, 0.5, 0.2, 1.0], [-1.0, -0.5, 0.0, 0.0]  # tried out of order; 0.2 and 1.0 tie
    fig = plots.sweep_figure(alphas, scores)
    ax = fig.axes[0]
    (best,) = [line for line in ax.lines if line.get_gid() == "best"]
    assert list(best.get_xdata()) == [0.2] and list(best.get_ydata()) == [0.0]  # the first best, as soup.sweep
    assert any(t.get_text().startswith("best α = 0.2\n") for t in ax.texts)
    curve = ax.lines[0]
    assert list(curve.get_xdata()) == [0.0, 0.2, 0.5, 1.0]  # drawn in α order


def test_greedy_marks_kept_and_skipped_trials():
    steps = [{"added": "x/good1", "score": -0.2, "kept": True}, {"added": "x/good2", "score": 0.0, "kept": True},
             {"added": "x/meh", "score": -0.1, "kept": False}, {"added": "x/bad", "score": -1.0, "kept": False}]
    fig = plots.greedy_figure(steps, {"x/good1": -0.2, "x/good2": -0.2, "x/meh": -0.6, "x/bad": -4.0})
    ax = fig.axes[0]
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert list(lines["kept"].get_xdata()) == [1, 2] and list(lines["skipped"].get_xdata()) == [3, 4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["good1", "good2", "meh", "bad"]
    assert ax.get_title() == "greedy soup: 2 of 4 kept, score 0"


def test_energy_is_the_share_of_squared_singular_values():
    assert plots.energy([3.0, 2.0, 1.0]) == pytest.approx([9 / 14, 13 / 14, 1.0])


def test_spectrum_marks_the_cap_and_the_median():
    spectra = {"layers.0.q": [4.0, 2.0, 1.0], "layers.1.q": [2.0, 2.0], "layers.10.q": [1.0], "layers.2.q": [0.0]}
    fig = plots.spectrum_figure(spectra, cap=3)
    sigma, kept = fig.axes
    medians = {ax: [line for line in ax.lines if line.get_gid() == "median"][0] for ax in (sigma, kept)}
    # normalized: [1, .5, .25], [1, 1, 0], [1, 0, 0] (zero past a module's rank); the all-zero module is left out
    assert list(medians[sigma].get_ydata()) == pytest.approx([1.0, 0.5, 0.0])
    # energy: [16/21, 20/21, 1], [1/2, 1, 1], [1, 1, 1]
    assert list(medians[kept].get_ydata()) == pytest.approx([statistics.median([16 / 21, 0.5, 1]), 1.0, 1.0])
    for ax in (sigma, kept):
        (cap,) = [line for line in ax.lines if line.get_gid() == "cap"]
        assert list(cap.get_xdata()) == [3, 3]
    assert "median energy kept at rank 3: 100.0%" in [t.get_text() for t in kept.texts]
    assert fig._suptitle.get_text() == "1 module(s) with ΔW = 0 left out"
    with pytest.raises(AdaptkitError, match="every module's ΔW is zero"):
        plots.spectrum_figure({"a": [0.0, 0.0]})


def test_spectrum_names_the_modules_a_cap_hurts_first():
    spectra = {f"layer.{i}": [1.0] * (i + 1) for i in range(10)}  # layer.i needs rank i + 1 for 99%
    fig = plots.spectrum_figure(spectra)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:6] == ["4", "5", "6", "7", "8", "9"]  # in layer order, the six that need the most rank
    assert fig.axes[0].get_legend().get_title().get_text() == "+4 more modules (grey)"


def test_quantize_and_merge_mark_the_worst():
    errors = {"model.layers.0.q": 0.01, "model.layers.1.q": 0.09, "model.layers.10.q": 0.03}
    fig = plots.quantize_figure(errors, "int8")
    worst = fig.axes[1]
    top = max(worst.patches, key=lambda p: p.get_y())
    assert top.get_width() == pytest.approx(0.09)
    assert top.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)  # tab:red
    top_down = sorted(zip(worst.get_yticks(), worst.get_yticklabels()), key=lambda tick: -tick[0])
    assert [label.get_text() for _, label in top_down] == ["1.q", "10.q", "0.q"]  # worst on top
    fig = plots.merge_figure(errors, rank=4)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.q", "1.q", "10.q"]  # layer order
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.01, 0.09, 0.03]
    assert ax.texts[0].get_text() == "worst: 1.q\n0.09"


def test_routing_marks_the_degenerate_layers_and_writes_each_similarity():
    similarity = [[1.0, 0.96], [0.96, 1.0]]
    fig = plots.routing_figure(similarity, [1.5, 7.0, 2.0], ["0: a", "1: b"], threshold=5.0)
    heat, layers = fig.axes[:2]
    assert [t.get_text() for t in heat.texts] == ["1.00", "0.96", "0.96", "1.00"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["0: a", "1: b"]
    bars = layers.patches
    assert [round(b.get_height(), 6) for b in bars] == [1.5, 7.0, 2.0]
    red = (0.839, 0.153, 0.157)  # tab:red: the degenerate layer alone
    assert [b.get_facecolor()[:3] == pytest.approx(red, abs=1e-3) for b in bars] == [False, True, False]
    assert layers.get_title() == "routers per layer: 1 of 3 degenerate" and layers.get_yscale() == "linear"
    assert plots.routing_figure(similarity, [1.0, 1e6], ["a", "b"], 5.0).axes[1].get_yscale() == "log"
    with pytest.raises(AdaptkitError, match="a row per expert and a condition per layer"):
        plots.routing_figure(similarity, [], ["a", "b"], 5.0)


def test_training_curves_average_the_loss_and_show_the_evaluation():
    records = [{"step": i, "loss": float(i % 2)} for i in range(1, 101)]
    records[49]["eval_loss"], records[99]["eval_loss"], records[99]["eval_accuracy"] = 0.7, 0.5, 0.75
    fig = plots.training_figure(records)
    loss, accuracy = fig.axes
    labels = [line.get_label() for line in loss.lines]
    assert "training loss (mean of 4 steps)" in labels and "evaluation loss" in labels
    averaged = loss.lines[labels.index("training loss (mean of 4 steps)")]
    assert list(averaged.get_ydata()) == pytest.approx([0.5] * 97)
    assert list(accuracy.lines[0].get_xdata()) == [100] and accuracy.get_title() == "evaluation accuracy: last 0.75"
    assert _moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]


# -- the spectrum's numbers ----------------------------------------------------------------------------
def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it: its merged model's weights minus the base's."""
    from peft import PeftModel

    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    merged = PeftModel.from_pretrained(tiny_llama(), folder).merge_and_unload().state_dict()
    adapted = tuple(f"{m}.weight" for m in MODULES)
    return {k.removesuffix(".weight"): merged[k] - base[k] for k in base if k.endswith(adapted)}


@pytest.mark.parametrize("name, base", [("lora1", False), ("dora", True)], ids=["lora factors", "dora in full"])
def test_spectra_equal_peft_deltas_singular_values(models, name, base):
    spectra = plots.adapter_spectra(models / name, base=models / "llama" if base else None)
    deltas = peft_deltas(models / name)
    assert sorted(spectra) == sorted(deltas)
    for module, delta in deltas.items():
        want = torch.linalg.svdvals(delta.double())
        got = torch.tensor(spectra[module], dtype=torch.float64)
        torch.testing.assert_close(got[:4], want[:4], rtol=1e-4, atol=1e-7, msg=module)
        assert len(got) == (4 if not base else len(want))  # the r × r core of the factors, or ΔW whole
        if base:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_spectrum_of_a_model_is_refused(models, tmp_path):
    result = run("inspect", models / "llama", "--plot", tmp_path / "s.png")
    assert result.exit_code == 1 and "draws an adapter's spectrum" in result.output
    result = run("inspect", models / "lora1", "--base", models / "llama")
    assert result.exit_code == 1 and "--base is read only with --plot" in result.output


# -- failures: one line, before any work, nothing left behind -----------------------------------------
@pytest.mark.parametrize("name, line", [
    ("curves.jpg", "ends in .png or .svg (the format), not '.jpg'"),
    ("curves", "not 'nothing'"),
    ("missing/curves.png", "the folder"),
], ids=["jpg", "no suffix", "no folder"])
def test_bad_target_is_one_line_before_work(ingredients, tmp_path, name, line):
    result = run("soup", "sweep", ingredients / "zero", ingredients / "bad", "--eval-py", "test_plots:score",
                 "-o", tmp_path / "best", "--plot", tmp_path / name)
    assert result.exit_code == 1 and line in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no soup was merged


def test_missing_matplotlib_names_the_extra(trained, tmp_path, monkeypatch):
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails as if not installed
    result = run("plot", trained / "out", "-o", tmp_path / "c.png")
    assert result.exit_code == 1
    assert result.output.strip() == "error: pictures need matplotlib: pip install 'adaptkit[plot]'"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_picture_and_no_temporary_file(tmp_path, monkeypatch):
    picture = tmp_path / "s.svg"
    picture.write_bytes(b"old")
    fig = plots.sweep_figure([0.0, 1.0], [0.0, 1.0])

    def broken(f, **kwargs):
        f.write(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError):
        plots.draw(fig, picture)
    assert picture.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["s.svg"]


@pytest.mark.parametrize("content, line", [
    ("", "no records"),
    ('{"step": 1, "loss": 0.5}\n[1, 2]\n', "metrics.jsonl:2: a record is an object with an integer 'step'"),
    ('{"loss": 0.5}\n', "metrics.jsonl:1: a record is an object with an integer 'step'"),
    ('{"step": 1, "loss": "low"}\n', "metrics.jsonl:1: 'loss' is 'low', not a number"),
    ('{"step": 1, "loss": 0.5}\n{"step": 2,\n', "metrics.jsonl:2: not valid JSON"),
], ids=["empty", "not an object", "no step", "loss not a number", "bad JSON"])
def test_bad_training_log_is_one_line(tmp_path, content, line):
    log = tmp_path / "metrics.jsonl"
    log.write_text(content)
    result = run("plot", log, "-o", tmp_path / "c.png")
    assert result.exit_code == 1 and line in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c.png").exists()
