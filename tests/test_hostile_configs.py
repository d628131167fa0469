"""Hostile configs, recipes and JSON lines: each row is (input builder, command, expected fragment) and
must end in one line on stderr, exit 1, through the real CLI.

Inputs are built by hand in tmp_path (numpy tensors of a few elements, JSON and YAML text), so the
whole file runs in seconds; only the rows that read a tokenizer use the packaged MiniLM.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hostile import assert_one_line_error, run_cli

LAYERS = 2
Q = "model.layers.{}.self_attn.q_proj"


# -- builders --------------------------------------------------------------------------------------
def model(folder: Path, **config) -> Path:
    """A two-layer 'model': one 4 × 4 q_proj per layer, and its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{Q.format(i)}.weight": np.full((4, 4), i + 1.0, np.float32) for i in range(LAYERS)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS, **config}))
    return folder


def lora(folder: Path, config_text: str | bytes | None = None, *, rank: int = 4, b_rank: int | None = None,
         magnitude: int = 0, **config) -> Path:
    """A PEFT LoRA folder on `model`'s q_proj layers (A rank × 4, B 4 × b_rank, DoRA magnitudes of
    `magnitude` values if given); `config` overrides adapter_config.json fields, `config_text`
    replaces the file."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(LAYERS):
        key = f"base_model.model.{Q.format(i)}"
        tensors[f"{key}.lora_A.weight"] = np.ones((rank, 4), np.float32)
        tensors[f"{key}.lora_B.weight"] = np.ones((4, b_rank or rank), np.float32)
        if magnitude:
            tensors[f"{key}.lora_magnitude_vector"] = np.ones(magnitude, np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    full = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    text = json.dumps(full) if config_text is None else config_text
    (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def adalora_case(e_rows: int = 4, **config):
    """An AdaLoRA folder whose E has `e_rows` rows (A and B have rank 4); `config` as in `lora`."""
    def build(root: Path) -> dict:
        folder, key = root / "adalora", f"base_model.model.{Q.format(0)}"
        folder.mkdir()
        save_file({f"{key}.lora_A": np.ones((4, 4), np.float32), f"{key}.lora_E": np.ones((e_rows, 1), np.float32),
                   f"{key}.lora_B": np.ones((4, 4), np.float32)}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8,
                                                                **config}))
        return {"adapter": folder}

    return build


def adapter_case(config_text=None, **options):
    return lambda root: {"adapter": lora(root / "lora", config_text, **options)}


def models_case(**config):
    return lambda root: {"m1": model(root / "m1", **config), "m2": model(root / "m2", **config)}


def recipe_case(text: str | bytes):
    """Two models and an adapter beside a recipe; `text` may name them as {m1}, {m2}, {lora}."""
    def build(root: Path) -> dict:
        found = {"m1": model(root / "m1"), "m2": model(root / "m2"), "lora": lora(root / "lora")}
        body = text.replace(b"{m1}", str(found["m1"]).encode()) if isinstance(text, bytes) else text.format(**found)
        (root / "r.yaml").write_bytes(body if isinstance(body, bytes) else body.encode())
        return {**found, "recipe": root / "r.yaml"}

    return build


def data_case(body: bytes | str):
    def build(root: Path) -> dict:
        (root / "d.jsonl").write_bytes(body if isinstance(body, bytes) else body.encode())
        return {"data": root / "d.jsonl"}

    return build


def trained_case(**info):
    """An adapter folder with a training.json, for `eval ADAPTER`."""
    def build(root: Path) -> dict:
        folder = lora(root / "trained")
        (folder / "training.json").write_text(json.dumps({"base": "minilm", "task": "classification", **info}))
        (root / "d.jsonl").write_text('{"text": "a", "label": "pos"}\n')
        return {"adapter": folder, "data": root / "d.jsonl"}

    return build


def kohya_case(alpha: float):
    def build(root: Path) -> dict:
        p = "lora_unet_down_blocks_0_attentions_0_proj_in"
        save_file({f"{p}.lora_down.weight": np.ones((2, 4), np.float32), f"{p}.lora_up.weight": np.ones((4, 2), np.float32),
                   f"{p}.alpha": np.array(alpha, np.float32)}, str(root / "k.safetensors"))
        return {"kohya": root / "k.safetensors"}

    return build


def deep_json(levels: int) -> str:
    return '{"r": 4, "lora_alpha": ' + "[" * levels + "]" * levels + "}"


def alias_bomb() -> str:
    """Nine levels of ten aliases each: 10^9 strings once expanded, a few hundred bytes on disk."""
    lines = ["merge_method: linear", "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "\n".join(lines + ["models: *l8", ""])


def run(case, command, tmp_path):
    paths = case(tmp_path)
    args = [str(a).format(**{k: str(v) for k, v in paths.items()}, out=tmp_path / "out") for a in command]
    return run_cli(*args)


def check(case, command, fragment, tmp_path):
    line = assert_one_line_error(run(case, command, tmp_path), fragment)
    assert len(line) < 400, line  # a message never carries a whole structure
    assert not (tmp_path / "out").exists()


# -- adapter_config.json: each field has the type it must have ------------------------------------
INSPECT = ["inspect", "{adapter}"]
ADAPTER_TYPES = [
    ("r-string", adapter_case(r="4"), "r must be a positive integer, got '4'"),
    ("r-bool", adapter_case(r=True), "r must be a positive integer, got True"),
    ("r-float", adapter_case(r=4.0), "r must be a positive integer, got 4.0"),
    ("r-zero", adapter_case(r=0), "r must be a positive integer, got 0"),
    ("r-null", adapter_case(r=None), "r must be a positive integer, got None"),
    ("alpha-string", adapter_case(lora_alpha="8"), "lora_alpha must be a finite number, got '8'"),
    ("alpha-nan", adapter_case('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
     "lora_alpha must be a finite number, got nan"),
    ("alpha-inf", adapter_case('{"peft_type": "LORA", "r": 4, "lora_alpha": -Infinity}'),
     "lora_alpha must be a finite number, got -inf"),
    ("alpha-structure", adapter_case(lora_alpha={"x": list(range(5000))}),
     "lora_alpha must be a finite number, got a mapping of 1 key(s)"),
    ("alpha-huge-int", adapter_case(lora_alpha=10**4000),
     "lora_alpha must be a finite number, got an integer of about 4000"),
    ("alpha-pattern-list", adapter_case(alpha_pattern=[1, 2]), "alpha_pattern must be a mapping, got a list of 2 item(s)"),
    ("alpha-pattern-regex", adapter_case(alpha_pattern={"q_proj(": 2}),
     "alpha_pattern key 'q_proj(' is not a valid regex (missing ), unterminated subpattern"),
    ("alpha-pattern-value", adapter_case(alpha_pattern={"q_proj": "2"}),
     "alpha_pattern['q_proj'] must be a finite number, got '2'"),
    ("rank-pattern-value", adapter_case(rank_pattern={"q_proj": 2.5}),
     "rank_pattern['q_proj'] must be a positive integer, got 2.5"),
    ("rank-pattern-regex", adapter_case(rank_pattern={"*": 2}), "rank_pattern key '*' is not a valid regex"),
    ("target-modules-int", adapter_case(target_modules=5),
     "target_modules must be a string or a list of strings, got 5"),
    ("target-modules-regex", adapter_case(target_modules="q_proj["), "target_modules 'q_proj[' is not a valid regex"),
    ("modules-to-save", adapter_case(modules_to_save=[1]), "modules_to_save must be a string or a list of strings"),
    ("use-dora-string", adapter_case(use_dora="yes"), "use_dora must be true or false, got 'yes'"),
    ("dropout-range", adapter_case(lora_dropout=1.5), "lora_dropout must be a number in [0, 1), got 1.5"),
    ("peft-type-list", adapter_case(peft_type=["LORA"]), "peft_type must be a string, got a list of 1 item(s)"),
    ("layers-to-transform", adapter_case(layers_to_transform="0"),
     "layers_to_transform must be an integer ≥ 0 or a list"),
    ("adalora-init-r", adalora_case(init_r="4"), "init_r must be an integer ≥ 0, got '4'"),
    ("adalora-mask", adalora_case(rank_pattern={"q_proj.lora_E": [1, 0]}),
     "rank_pattern['q_proj.lora_E'][0] must be true or false, got 1"),
    ("duplicate-key", adapter_case('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "r": 8}'),
     "adapter_config.json: duplicate key 'r'"),
    ("not-an-object", adapter_case("[1, 2]"), "adapter_config.json: expected a JSON object, found a list"),
    ("not-utf8", adapter_case(b'{"peft_type": "LORA",\n "r": 4, "base_model_name_or_path": "caf\xe9"}'),
     "adapter_config.json:2: not UTF-8 text"),
    ("invalid-json", adapter_case('{"peft_type": "LORA",\n "r": 4,\n}'), "adapter_config.json:3: not valid JSON"),
    ("deep-nesting", adapter_case(deep_json(100)), "nested more than 64 levels deep"),
    ("deeper-than-python", adapter_case(deep_json(100_000)), "nested more than 64 levels deep"),
]


@pytest.mark.parametrize("case,fragment", [pytest.param(c, f, id=i) for i, c, f in ADAPTER_TYPES])
def test_adapter_config_fields_have_their_types(case, fragment, tmp_path):
    check(case, INSPECT, fragment, tmp_path)


# -- a config that contradicts its tensors -----------------------------------------------------------
CONTRADICTIONS = [
    ("rank-vs-r", adapter_case(rank=4, r=8), INSPECT,
     "module 'model.layers.0.self_attn.q_proj' stores rank 4 but the config says 8 (r / rank_pattern)"),
    ("rank-vs-huge-r", adapter_case(r=10**4000), INSPECT,
     "stores rank 4 but the config says an integer of about 4000 digits"),
    ("rank-vs-rank-pattern", adapter_case(rank_pattern={"layers.1.self_attn.q_proj": 2}), INSPECT,
     "module 'model.layers.1.self_attn.q_proj' stores rank 4 but the config says 2"),
    ("magnitude-shape", adapter_case(magnitude=3, use_dora=True), INSPECT,
     "lora_magnitude_vector [3] should hold 4 values, one per output"),
    ("factors-do-not-chain", adapter_case(rank=4, b_rank=2), INSPECT,
     "lora_A [4, 4] and lora_B [4, 2] do not form a rank ≥ 1 product"),
    ("dora-without-magnitudes", adapter_case(use_dora=True), INSPECT,
     "use_dora is true but module 'model.layers.0.self_attn.q_proj' has no lora_magnitude_vector"),
    ("magnitudes-without-dora", adapter_case(magnitude=4), INSPECT,
     "use_dora is false but module 'model.layers.0.self_attn.q_proj' has a lora_magnitude_vector"),
    ("adalora-shapes", adalora_case(3), INSPECT, "lora_A [4, 4], lora_E [3, 1] and lora_B [4, 4] do not agree"),
    ("dora-merge", adapter_case(use_dora=True), ["merge", "--method", "concat", "-m", "{adapter}", "-m", "{adapter}",
                                                 "-o", "{out}"], "has no lora_magnitude_vector"),
    ("kohya-nan-alpha", kohya_case(float("nan")), ["convert", "{kohya}", "--to", "peft", "-o", "{out}"],
     "module 'unet.down_blocks.0.attentions.0.proj_in' alpha must be a finite number, got nan"),
    ("kohya-inf-alpha", kohya_case(float("inf")), ["inspect", "{kohya}"], "alpha must be a finite number, got inf"),
]


@pytest.mark.parametrize("case,command,fragment",
                         [pytest.param(c, cmd, f, id=i) for i, c, cmd, f in CONTRADICTIONS])
def test_a_config_that_contradicts_its_tensors_is_an_error(case, command, fragment, tmp_path):
    check(case, command, fragment, tmp_path)


def test_a_consistent_adapter_still_reads(tmp_path):
    """The same checks pass an adapter whose config and tensors agree (DoRA, a matching rank_pattern)."""
    folder = lora(tmp_path / "lora", magnitude=4, use_dora=True, rank_pattern={"layers.1.self_attn.q_proj": 4},
                  alpha_pattern={"q_proj": 16})
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapter"]["use_dora"] is True


def test_a_gradient_past_the_layers_the_config_counts_is_an_error(tmp_path):
    """num_hidden_layers: 2 but tensors in layers 0..3: a gradient has no value past its end."""
    for name in ("m1", "m2"):
        folder = model(tmp_path / name)
        tensors = {f"{Q.format(i)}.weight": np.ones((4, 4), np.float32) for i in range(4)}
        save_file(tensors, str(folder / "model.safetensors"))
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'm1'}\n"
                                     f"    parameters: {{weight: [0, 1]}}\n  - model: {tmp_path / 'm2'}\n"
                                     f"    parameters: {{weight: 1}}\n")
    result = run_cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert_one_line_error(result, "tensor 'model.layers.2.self_attn.q_proj.weight' lies past the last layer")


# -- config.json of a model --------------------------------------------------------------------------
QUICK = ["merge", "--method", "linear", "-m", "{m1}", "-m", "{m2}", "-o", "{out}"]
MODEL_TYPES = [
    ("layers-string", models_case(num_hidden_layers="2"), QUICK, "num_hidden_layers must be an integer ≥ 0, got '2'"),
    ("layers-float", models_case(num_hidden_layers=2.5), QUICK, "num_hidden_layers must be an integer ≥ 0, got 2.5"),
    ("architectures-string", models_case(architectures="Llama"), QUICK, "architectures must be a list, got 'Llama'"),
    ("model-type-number", models_case(model_type=3), QUICK, "model_type must be a string, got 3"),
    ("inspect-layers-structure", models_case(num_hidden_layers={"x": list(range(5000))}), ["inspect", "{m1}"],
     "config.json: num_hidden_layers must be an integer ≥ 0, got a mapping of 1 key(s)"),
    ("id2label-values", models_case(id2label={"0": 1}), ["inspect", "{m1}"], "id2label['0'] must be a string, got 1"),
]


@pytest.mark.parametrize("case,command,fragment", [pytest.param(c, cmd, f, id=i) for i, c, cmd, f in MODEL_TYPES])
def test_model_config_fields_have_their_types(case, command, fragment, tmp_path):
    check(case, command, fragment, tmp_path)


# -- recipes -----------------------------------------------------------------------------------------
MERGE = ["merge", "{recipe}", "-o", "{out}"]
TWO = "models:\n  - model: {m1}\n    parameters: {{weight: 1}}\n  - model: {m2}\n    parameters: {{weight: 1}}\n"
RECIPES = [
    ("method-list", "merge_method: [linear]\n" + TWO, "r.yaml: merge_method must be a string, got a list of 1 item(s)"),
    ("models-mapping", "merge_method: linear\nmodels: {{a: 1}}\n", "r.yaml: models must be a non-empty list, got a mapping of 1 key(s)"),
    ("seed-string", "merge_method: linear\nseed: '1'\n" + TWO, "r.yaml: seed must be an integer ≥ 0, got '1'"),
    ("seed-float", "merge_method: linear\nseed: 1.5\n" + TWO, "r.yaml: seed must be an integer ≥ 0, got 1.5"),
    ("seed-date", "merge_method: linear\nseed: 2024-01-01\n" + TWO, "r.yaml: seed must be an integer ≥ 0, got date"),
    ("parameters-list", "merge_method: linear\nparameters: [1]\n" + TWO, "r.yaml: parameters must be a mapping, got a list"),
    ("model-parameters-string", "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: heavy\n",
     "r.yaml: models[0].parameters must be a mapping, got 'heavy'"),
    ("output-list", "merge_method: linear\noutput: [adapter]\n" + TWO, "r.yaml: output must be a mapping, got a list"),
    ("output-rank-zero", "merge_method: linear\noutput: {{kind: adapter, rank: 0}}\n" + TWO,
     "r.yaml: output: rank must be a positive integer, got 0"),
    ("weight-nan", "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: .nan}}\n",
     "r.yaml: models[0].parameters.weight must be a finite number, got nan"),
    ("weight-inf-gradient", "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: [0, .inf]}}\n",
     "r.yaml: models[0].parameters.weight[1] must be a finite number, got inf"),
    ("weight-null", "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: null}}\n",
     "models[0].parameters.weight must be a number, true/false or a string, got None"),
    ("filter-number",
     "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: [{{filter: 3, value: 1}}]}}\n",
     "models[0].parameters.weight[0]: filter must be a string, got 3"),
    ("condition-mixed", "merge_method: linear\nparameters: {{weight: [1, {{value: 2}}]}}\n" + TWO,
     "parameters.weight[0]: a list of conditions holds only {filter, value} mappings, got 1"),
    ("model-path-number", "merge_method: linear\nmodels:\n  - model: {{path: 5}}\n",
     "r.yaml: models[0].model: a model reference mapping has 'model' and optionally 'lora', got path"),
    ("key-not-a-name", "merge_method: linear\n1: x\n" + TWO, "r.yaml: keys must be names, got 1"),
    ("model-path-missing", "merge_method: linear\nmodels:\n  - model: ./missing-model\n    parameters: {{weight: 1}}\n"
     "  - model: {m1}\n    parameters: {{weight: 1}}\n", "./missing-model: no such folder"),
    ("base-path-missing", "merge_method: task_arithmetic\nbase_model: ../nowhere/base\n" + TWO,
     "../nowhere/base: no such folder"),
    ("adapter-path-missing", "merge_method: linear\nmodels:\n  - model: {m1}+./no-lora\n    parameters: {{weight: 1}}\n",
     "./no-lora: no such folder"),
    ("adapter-empty", "merge_method: linear\nmodels:\n  - model: {m1}+\n", "has an empty part around '+'"),
    ("weights-file-missing", "merge_method: linear\nmodels:\n  - model: ./gone.safetensors\n    parameters: {{weight: 1}}\n",
     "./gone.safetensors: no such file"),
    ("not-utf8", b"merge_method: linear\nmodels:\n  - model: caf\xe9\n", "r.yaml:3: not UTF-8 text"),
    ("syntax", "merge_method: linear\nmodels: [a, b\n", "r.yaml:3: not valid YAML"),
    ("control-character", "merge_method: linear\nmodels: [a\x07]\n",
     "r.yaml:2: not valid YAML (character #x0007 is not allowed)"),
    ("huge-integer", "merge_method: linear\nseed: " + "9" * 5000 + "\n" + TWO, "not valid YAML (Exceeds the limit"),
    ("deep-nesting", "merge_method: linear\nmodels: " + "[" * 200 + "]" * 200 + "\n",
     "r.yaml:2: not valid YAML (nested more than 64 levels deep)"),
    ("alias-bomb", alias_bomb(), "aliases expand to more than 100000 nodes; refused before expanding them"),
    ("alias-cycle", "merge_method: linear\nmodels: &a [*a]\n", "r.yaml:2: an alias refers to a node that contains it"),
    ("duplicate-key", "merge_method: linear\n" + TWO + "merge_method: ties\n", "duplicate key 'merge_method'"),
    ("not-a-mapping", "- merge_method: linear\n",
     "r.yaml: a recipe is a mapping with at least 'merge_method' and 'models', got a list"),
    ("empty", "", "the recipe is empty"),
]


@pytest.mark.parametrize("text,fragment", [pytest.param(t, f, id=i) for i, t, f in RECIPES])
def test_recipes_are_checked(text, fragment, tmp_path):
    check(recipe_case(text), MERGE, fragment, tmp_path)


def test_recipe_aliases_within_bounds_still_work(tmp_path):
    """Anchors and aliases for reuse, as people write them, are not refused."""
    paths = recipe_case("merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: &w {{weight: 0.5}}\n"
                        "  - model: {m2}\n    parameters: *w\n")(tmp_path)
    result = run_cli("merge", paths["recipe"], "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == LAYERS


QUICK_FORMS = [
    ("weight-nan", ["merge", "-m", "{m1}:nan", "-m", "{m2}", "-o", "{out}"],
     "models[0].parameters.weight must be a finite number, got nan"),
    ("param-inf",
     ["merge", "--method", "task_arithmetic", "--base", "{m1}", "-m", "{m2}", "-p", "lambda=.inf", "-o", "{out}"],
     "parameters.lambda must be a finite number, got inf"),
    ("missing-model", ["merge", "-m", "./not-here", "-m", "{m2}", "-o", "{out}"], "./not-here: no such folder"),
    ("missing-home-model", ["merge", "-m", "~/not-here-either", "-m", "{m2}", "-o", "{out}"], "no such folder"),
]


@pytest.mark.parametrize("command,fragment", [pytest.param(c, f, id=i) for i, c, f in QUICK_FORMS])
def test_quick_form_values_are_checked(command, fragment, tmp_path):
    check(models_case(), command, fragment, tmp_path)


# -- JSON lines --------------------------------------------------------------------------------------
EVAL = ["eval", "minilm", "--data", "{data}"]
DATA = [
    ("not-utf8", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', EVAL, "d.jsonl:2: not UTF-8 text"),
    ("invalid-json", '{"text": "a"}\n\n{"text": }\n', EVAL, "d.jsonl:3: not valid JSON (Expecting value at column 10)"),
    ("deep-nesting", '{"text": "a"}\n{"text": ' + "[" * 100 + "]" * 100 + "}\n", EVAL,
     "d.jsonl:2: nested more than 64 levels deep"),
    ("deeper-than-python", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", EVAL,
     "d.jsonl:1: nested more than 64 levels deep"),
    ("huge-integer", '{"text": "a", "label": ' + "9" * 5000 + "}\n", EVAL, "d.jsonl:1: not valid JSON (Exceeds the limit"),
    ("duplicate-key", '{"text": "a"}\n{"text": "a", "text": "b"}\n', EVAL, "d.jsonl:2: duplicate key 'text'"),
    ("not-an-object", '{"text": "a"}\n["text"]\n', EVAL, "d.jsonl:2: a record must be a JSON object, got list"),
    ("label-too-large", '{"text": "a", "label": 0}\n{"text": "b", "label": 1000000000}\n',
     EVAL + ["--task", "classification"],
     "d.jsonl:2: label 1000000000 is not a class id (0 to 9999: at most 10000 classes)"),
    ("label-negative", '{"text": "a", "label": -1}\n', EVAL, "d.jsonl:1: label -1 is not a class id"),
    ("label-kinds", '{"text": "a", "label": 0}\n{"text": "b", "label": "pos"}\n', EVAL,
     "d.jsonl:2: label 'pos' is a string, earlier labels are integers"),
]


@pytest.mark.parametrize("body,command,fragment", [pytest.param(b, c, f, id=i) for i, b, c, f in DATA])
def test_json_lines_are_checked(body, command, fragment, tmp_path):
    check(data_case(body), command, fragment, tmp_path)


TRAINED = [
    ("labels-repeated", trained_case(labels=["pos", "pos"]), "training.json: labels names class 'pos' twice"),
    ("labels-mapping", trained_case(labels={"pos": 0}), "training.json: labels must be a list, got a mapping"),
    ("task-unknown", trained_case(task="regression"), "task must be one of causal-lm, classification, got 'regression'"),
    ("base-number", trained_case(base=7), "training.json: base must be a string, got 7"),
]


@pytest.mark.parametrize("case,fragment", [pytest.param(c, f, id=i) for i, c, f in TRAINED])
def test_training_json_is_checked(case, fragment, tmp_path):
    check(case, ["eval", "{adapter}", "--data", "{data}"], fragment, tmp_path)


# -- settings given on the command line --------------------------------------------------------------
TRAIN = ["train", "--base", "minilm", "--variant", "lora", "--data", "{data}", "--max-steps", "1", "-o", "{out}"]
SETTINGS = [
    ("rank-float", ["--set", "r=2.5"], "lora settings: r must be a positive integer, got 2.5"),
    ("alpha-nan", ["--set", "lora_alpha=NaN"], "lora settings: lora_alpha must be a finite number, got nan"),
    ("targets-regex", ["--set", "target_modules=query("], "target_modules 'query(' is not a valid regex"),
]


@pytest.mark.parametrize("extra,fragment", [pytest.param(e, f, id=i) for i, e, f in SETTINGS])
def test_train_settings_are_checked(extra, fragment, tmp_path):
    check(data_case('{"text": "one two three four"}\n'), TRAIN + extra, fragment, tmp_path)


# -- soups -------------------------------------------------------------------------------------------
SOUPS = [
    ("greedy-nan", ["soup", "greedy", "-m", "{m1}", "-m", "{m2}", "--eval-cmd", "echo nan", "-o", "{out}"],
     "candidate {m1}: the score is nan; a soup needs finite numbers"),
    ("greedy-inf", ["soup", "greedy", "-m", "{m1}", "-m", "{m2}", "--eval-cmd", "echo -inf", "-o", "{out}"],
     "the score is -inf; a soup needs finite numbers"),
    ("sweep-nan", ["soup", "sweep", "{m1}", "{m2}", "--alphas", "0,1", "--eval-cmd", "echo nan", "-o", "{out}"],
     "alpha 0.0: the score is nan"),
    ("sweep-alpha-nan", ["soup", "sweep", "{m1}", "{m2}", "--alphas", "nan,1", "--eval-cmd", "echo 1", "-o", "{out}"],
     "sweep alpha is nan; a soup needs finite numbers"),
]


@pytest.mark.parametrize("command,fragment", [pytest.param(c, f, id=i) for i, c, f in SOUPS])
def test_soup_scores_must_be_finite(command, fragment, tmp_path):
    paths = models_case()(tmp_path)
    check(lambda _: paths, command, fragment.format(**paths), tmp_path)


def test_a_greedy_soup_step_scoring_nan_is_named(tmp_path):
    """The candidates score fine on their own; the trial soup of both scores NaN."""
    paths = models_case()(tmp_path)
    script = tmp_path / "score.sh"
    script.write_text('case "$1" in */trial[0-9]*) echo nan;; *) echo 1;; esac\n')
    result = run_cli("soup", "greedy", "-m", paths["m1"], "-m", paths["m2"], "--eval-cmd", f"sh {script} {{model}}",
                     "-o", tmp_path / "out")
    assert_one_line_error(result, f"the soup with candidate {paths['m2']} added: the score is nan")
    assert not (tmp_path / "out").exists()
