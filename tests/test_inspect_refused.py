"""`adaptkit inspect` describes an adapter that load, merge and convert refuse (a config field adaptkit does not
implement, such as KaSA's `kasa_config`): it exits 0 with the adapter's figures and the refusal as an
"unsupported" row (`unsupported` in --json), while the commands that use the adapter still refuse it in one
line naming the field (`errors.UnsupportedError`). An adapter whose config contradicts its tensors is malformed,
not unsupported: `inspect` stays an error there (tests/test_hostile_configs.py has the table)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptkit.cli import cli
from builders import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A PEFT LoRA with an edited config per row, the tiny base saved beside them."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("refused")
    torch.manual_seed(0)
    base = tiny_llama()
    (root / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, root / "base" / "model.safetensors")
    (root / "base" / "config.json").write_text(base.config.to_json_string())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False))
        peft.save_pretrained(root / "plain")
    config = json.loads((root / "plain" / "adapter_config.json").read_text())
    for name, edits in EDITS.items():
        (root / name).mkdir()
        (root / name / "adapter_model.safetensors").write_bytes((root / "plain" / "adapter_model.safetensors").read_bytes())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **edits}))
    return root


EDITS = {"kasa": {"kasa_config": {}}, "bdlora": {"use_bdlora": True}, "pissa": {"init_lora_weights": "pissa"},
         "rank": {"r": 3}}
# (folder, what the refusal names)
ROWS = [("kasa", "kasa_config"), ("bdlora", "use_bdlora"), ("pissa", "init_lora_weights='pissa'")]


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.parametrize("folder, named", ROWS, ids=[r[0] for r in ROWS])
def test_inspect_describes_the_refused_adapter_and_says_why(folders, folder, named):
    text = invoke("inspect", folders / folder)
    assert text.exit_code == 0, text.output
    rows = {line.split(None, 1)[0]: line for line in text.output.splitlines()[1:]}
    assert named in rows["unsupported"]
    assert "lora" in rows["variant"] and "4" in rows["rank"]
    report = json.loads(invoke("inspect", folders / folder, "--json").stdout)
    assert report["kind"] == "adapter" and report["adapter"]["targeted_modules"] == 4  # q, v of 2 layers
    assert named in report["adapter"]["unsupported"] and "\n" not in report["adapter"]["unsupported"]


def test_a_malformed_adapter_is_still_an_error_in_inspect(folders):
    result = invoke("inspect", folders / "rank")
    assert result.exit_code == 1 and "stores rank 4 but the config says 3" in result.output


def test_inspect_of_a_supported_adapter_has_no_unsupported_row(folders):
    assert "unsupported" not in invoke("inspect", folders / "plain").output
    assert "unsupported" not in json.loads(invoke("inspect", folders / "plain", "--json").stdout)["adapter"]


@pytest.mark.parametrize("folder, named", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("command", [
    ("merge", "--base", "{base}", "-m", "{adapter}", "-o", "{out}"),
    ("merge", "-m", "{adapter}:0.5", "-m", "{plain}:0.5", "--rank", "4", "-o", "{out}"),
    ("convert", "{adapter}", "--to", "kohya", "-o", "{out}"),
], ids=["into-base", "adapters", "convert"])
def test_commands_that_use_it_still_refuse_in_one_line(folders, folder, named, command, tmp_path):
    paths = {"base": folders / "base", "adapter": folders / folder, "plain": folders / "plain", "out": tmp_path / "o"}
    result = invoke(*(part.format(**paths) for part in command))
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert named in message and len(message.splitlines()) == 1
    assert not (tmp_path / "o").exists()
