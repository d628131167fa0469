"""CLI conventions: help with examples everywhere, one-line errors, --json equal to the Python API."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import adaptkit
from adaptkit.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def all_commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, _ in all_commands()] + [()], ids=lambda p: " ".join(p) or "adaptkit")
def test_every_command_has_help_with_an_example(path):
    result = run(*path, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_inspect_json_equals_python_api(peft_lora_dir):
    result = run("inspect", str(peft_lora_dir), "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(json.dumps(adaptkit.inspect(peft_lora_dir)))


def test_inspect_text(sharded_llama_dir, peft_lora_dir):
    text = run("inspect", str(sharded_llama_dir)).output
    assert "model (llama, LlamaForCausalLM)" in text and "file(s)" in text
    text = run("inspect", str(peft_lora_dir)).output
    assert "2..4 (varies)" in text and "lm_head.weight" in text


def test_user_error_is_one_line_exit_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adaptkit", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder"]
    debug = subprocess.run([sys.executable, "-m", "adaptkit", "--debug", "inspect", str(tmp_path / "missing")],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_warning_is_one_line(peft_lora_dir, tmp_path):
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(peft_lora_dir, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["future_key"] = None
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "adaptkit", "inspect", str(copy)], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == [
        f"warning: {copy / 'adapter_config.json'}: ignoring unknown config keys future_key, all unset (written by a newer PEFT?)"]
    quiet = subprocess.run([sys.executable, "-m", "adaptkit", "--quiet", "inspect", str(copy)], capture_output=True, text=True)
    assert quiet.stderr == ""
    after = subprocess.run([sys.executable, "-m", "adaptkit", "inspect", str(copy), "-q"], capture_output=True, text=True)
    assert after.returncode == 0 and after.stderr == ""  # --quiet after the subcommand too


def test_plugins_listing():
    result = run("plugins", "--json")
    rows = json.loads(result.output)
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["kind"] == "variant" and lora["source"] == "built-in" and lora["description"].startswith("LoRA")
    checked = json.loads(run("plugins", "--check", "--json").output)
    assert all(r["status"] == "ok" for r in checked)
    assert all(r["kind"] == "format" for r in json.loads(run("plugins", "--kind", "format", "--json").output))
