"""PEFT's own test matrix through adaptkit (benchmarks/peft_matrix.py; its docstring has the steps).

The types adaptkit has always claimed — LoRA, IA3, VeRA and AdaLoRA on Linear, GPT-2 Conv1D and
Embedding layers — must be equal to PEFT in all three directions: loaded, merged (mode 2) and
written back for PEFT. The whole matrix (every PEFT type, conv layers, MHA, prompt learning, ...) may
refuse what it does not support, in one line, but no case may be silently wrong or crash.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peft_matrix as matrix  # noqa: E402  (benchmarks/ is not a package)

CLAIMED = ("LoraConfig", "IA3Config", "VeraConfig", "AdaLoraConfig")
PLAIN_MODELS = ("MLP", "MLP2", "MLP_LayerNorm", "EmbConv1D", *matrix.DECODERS)
# Options of these configs that are their own features, covered by their own tests and the whole matrix.
OWN_FEATURES = ("kasa_config", "velora_config", "monteclora_config", "use_bdlora", "alora_invocation_tokens",
                "trainable_token_indices", "target_parameters")


def claimed(case: matrix.Case) -> bool:
    return (case.config_cls in CLAIMED and case.model in PLAIN_MODELS
            and not any(key in case.kwargs for key in OWN_FEATURES)
            and case.kwargs.get("init_lora_weights") != "mica")


CASES = {case.name: case for case in matrix.all_cases() if claimed(case)}


@pytest.fixture(scope="module")
def rows():
    """The claimed cases, run once for the module (about 60 cases, tiny models)."""
    return {row["name"]: row for row in matrix.run_all(list(CASES.values()))}


def test_the_table_covers_the_claimed_types_and_layers(rows):
    assert len(rows) >= 50
    assert {r["type"].split("+")[0] for r in rows.values()} == {"LORA", "IA3", "VERA", "ADALORA"}
    assert {r["layer"] for r in rows.values()} >= {"Linear", "Conv1D (GPT-2)", "Embedding"}
    assert "PEFT type" in matrix.table(list(rows.values()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_claimed_case_equals_peft(rows, name):
    row = rows[name]
    assert (row["load"], row["merge"], row["reverse"]) == ("equal", "equal", "equal"), row


def test_comparison_catches_a_wrong_answer():
    import torch

    want = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert matrix.compare(want + 1e-6, want) == "equal"
    assert matrix.compare(want * 1.01, want).startswith("WRONG")
    assert matrix.compare(want[:1], want).startswith("WRONG: shape")


def test_status_orders_outcomes_worst_first():
    row = {"load": "equal", "merge": "refused: no", "reverse": "WRONG: rel 0.5"}
    assert matrix.status(row) == "WRONG"
    assert matrix.status({**row, "reverse": "FAILED: KeyError"}) == "FAILED"
    assert matrix.status({**row, "reverse": "n/a: not loaded"}) == "refused"
    assert matrix.status({s: "n/a: PEFT" for s in matrix.STAGES}) == "n/a"


@pytest.mark.slow
def test_no_case_of_the_whole_matrix_is_silently_wrong_or_crashes():
    """Every row of PEFT's matrix (about 560 cases, a few minutes): equal, or refused in one line."""
    everything = matrix.run_all(matrix.all_cases())
    bad = [f"{r['name']}: " + "; ".join(f"{s} {r[s]}" for s in matrix.STAGES)
           for r in everything if matrix.status(r) in ("WRONG", "FAILED")]
    assert not bad, "\n".join(bad)
    refusals = [r[s] for r in everything for s in matrix.STAGES if r[s].startswith("refused")]
    assert all("\n" not in line and len(line) < 400 for line in refusals)
    # PEFT reads every config adaptkit writes without meeting a key it does not know
    unknown = [f"{r['name']}: {n}" for r in everything for n in r["notes"] if "Unexpected keyword" in n]
    assert not unknown, "\n".join(unknown)
