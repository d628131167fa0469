"""The core never names a particular variant, merge method, quantizer or format."""
from __future__ import annotations

import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "adaptkit"
# Plugin names; "lora" and "peft" may appear in prose (PEFT's layout is the canonical file format)
# but never as a name the code looks up.
NAMES = r"\b(vera|tied_?lora|delta_?lora|adalora|loreft|lora_fa|loraplus|lora_plus|dora|ia3|nf4|fp4|" \
        r"kohya|diffusers|ties|dare|slerp|breadcrumbs|model_stock)\b|[\"'](lora|peft)[\"']"


def test_core_names_no_plugin():
    offenders = []
    for path in CORE.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(NAMES, line, flags=re.IGNORECASE):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_core_modules_stay_small():
    big = [p.name for p in CORE.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert not big
