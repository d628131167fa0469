"""The last gaps of PEFT-matrix coverage (issue 16), each against its reference written out or PEFT itself.

- kohya / LyCORIS `alpha` of 0: sd-scripts' and LyCORIS's modules read `alpha is None or alpha == 0` as
  alpha = rank, so ΔW = up·down (scale 1), not 0; a scale-0 module cannot be written there.
- aLoRA and beam search: PEFT's `generate` raises "Beam search not yet supported for aLoRA."; so does
  `model.generate` here, in one line, while an aLoRA is active (num_beams given or in the generation config).
- nn.MultiheadAttention's `out_proj` as a target layer: MHA's forward reads out_proj.weight itself, so
  PEFT's adapter there leaves the outputs as they are; here it is refused by name (target the MHA), and
  the matrix harness (benchmarks/peft_matrix.py) counts such a case as a refusal.
- The token embedding named in target_modules beside `trainable_token_indices`: PEFT 0.21.2 raises
  ("trainable_token_indices cannot be applied to modules of type lora.Embedding") however the layer is
  named; so does adaptkit (the full path used to drop the LoRA silently), while PEFT's files still load.
- Prefix tuning on Gemma 2 and Gemma 3: PEFT writes the prefix into the model's own cache (sliding-window
  layers keep the last window − 1 tokens); a dynamic cache of the prefix under the model's sliding masks
  gives the same logits, with a window shorter than prefix + input too (was refused).
- DoRA on a grouped Conv2d stays refused: PEFT's forward is m / n · conv(x, W_eff), W_eff the grouped W
  plus s·ΔW of its lora_B(lora_A(x)) (a dense kernel), but n, the norm it divides by, is that of
  W + s·reshape(B.view(−1, r) @ A.view(r, −1)), B·A reshaped across groups (a channel's norm moves with
  another group's B), not ‖W_eff‖; and PEFT cannot merge it. The numbers are checked below.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.live.targets import adapted_layers
from adaptkit.spec import LowRankAdapter, LowRankModule
from builders import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peft_matrix as matrix  # noqa: E402  (benchmarks/ is not a package)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
TOL = dict(atol=1e-5, rtol=1e-4)
KOHYA = registry.get("format", "kohya")
LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # a linear layer of the CLIP text encoder
LINEAR_PATH = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- kohya / LyCORIS alpha 0 ---------------------------------------------------------------------------
DOWN, UP = rand(3, 10), rand(12, 3, seed=1)
W1A, W1B, W2A, W2B = rand(12, 2, seed=2), rand(2, 10, seed=3), rand(12, 2, seed=4), rand(2, 10, seed=5)
K1, K2A, K2B = rand(3, 2, seed=6), rand(4, 1, seed=7), rand(1, 5, seed=8)
ALPHA_CASES = [  # (id, tensors of the module, its rank, ΔW with scale 1 written out)
    ("lora", {"lora_down.weight": DOWN, "lora_up.weight": UP}, 3, UP @ DOWN),
    ("loha", {"hada_w1_a": W1A, "hada_w1_b": W1B, "hada_w2_a": W2A, "hada_w2_b": W2B}, 2, (W1A @ W1B) * (W2A @ W2B)),
    ("lokr", {"lokr_w1": K1, "lokr_w2_a": K2A, "lokr_w2_b": K2B}, 1, torch.kron(K1, K2A @ K2B)),
]


@pytest.mark.parametrize("alpha", [0.0, 3.0], ids=["zero-is-rank", "stated"])
@pytest.mark.parametrize("case", ALPHA_CASES, ids=[c[0] for c in ALPHA_CASES])
def test_kohya_alpha_zero_is_alpha_rank_as_sd_scripts_and_lycoris(case, alpha, tmp_path):
    kind, roles, rank, unit = case
    tensors = {f"{LINEAR}.{role}": t for role, t in roles.items()} | {f"{LINEAR}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(tmp_path / "net.safetensors"))
    files = read_adapter(tmp_path / "net.safetensors")
    assert files.variant == kind
    scale = 1.0 if alpha == 0 else alpha / rank  # `alpha = lora_dim if alpha is None or alpha == 0 else alpha`
    got = registry.get("variant", kind).delta(files, LINEAR_PATH)
    torch.testing.assert_close(got.float(), scale * unit, **TOL)


def test_a_scale_zero_module_is_not_written_as_kohya_alpha_zero(tmp_path):
    adapter = LowRankAdapter({LINEAR_PATH: LowRankModule(DOWN, UP, 0.0)})
    with pytest.raises(AdaptkitError, match=r"q_proj: alpha 0 \(scale 0\) cannot be written.*alpha = rank") as err:
        KOHYA.write(adapter, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


# -- aLoRA: no beam search -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def alora(llama, tmp_path_factory):
    """A PEFT aLoRA folder (invocation tokens 5, 6) and PEFT's model of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(llama), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                              alora_invocation_tokens=[5, 6], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("alora")
    pm.save_pretrained(folder)
    return folder, pm.eval()


IDS = torch.tensor([[3, 9, 5, 6, 11, 4]])
GENERATE = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("how", ["argument", "generation_config"])
def test_alora_refuses_beam_search_as_peft(llama, alora, how):
    folder, pm = alora
    model = copy.deepcopy(llama)
    handle = ak.load_adapter(model, folder)
    beams = {"num_beams": 2} if how == "argument" else {}
    if how == "generation_config":
        model.generation_config.num_beams = 2
    if how == "argument":
        with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
            pm.generate(input_ids=IDS, **GENERATE, **beams)
    with pytest.raises(AdaptkitError, match=r"beam search \(num_beams=2\) is not supported for aLoRA") as err:
        model.generate(input_ids=IDS, **GENERATE, **beams)
    assert "\n" not in str(err.value)
    model.generation_config.num_beams = 1
    with torch.no_grad():  # one beam runs, as in PEFT
        assert torch.equal(model.generate(input_ids=IDS, **GENERATE), pm.generate(input_ids=IDS, **GENERATE))
    handle.set_active([])  # an inactive aLoRA does not refuse beams
    assert model.generate(input_ids=IDS, **GENERATE, num_beams=2).shape == (1, IDS.shape[1] + 2)
    handle.remove("default")  # the hooks leave with the last input-reading adapter, and generate with them
    assert "generate" not in model.__dict__


# -- nn.MultiheadAttention's out_proj ----------------------------------------------------------------------
OUT_PROJ = matrix.Case("MHA out_proj LoRA", "MHA", "LoraConfig", {"target_modules": ["out_proj"]})


def test_peft_adapter_on_mha_out_proj_does_nothing_and_is_refused_here(tmp_path):
    base = OUT_PROJ.base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), matrix.peft_config(OUT_PROJ)).eval()
    assert type(pm.base_model.model.mha.out_proj).__name__ == "Linear"  # PEFT's LoRA wrapper ...
    torch.testing.assert_close(OUT_PROJ.run(pm), OUT_PROJ.run(base))  # ... which MHA's forward never calls
    pm.save_pretrained(tmp_path / "peft")
    for attempt in (lambda m: ak.load_adapter(m, tmp_path / "peft"),
                    lambda m: ak.Adapters.of(m).add("lora", r=2, target_modules=["out_proj"]),
                    lambda m: ak.Adapters.of(m).add("lora", r=2, target_modules="all-linear")):
        model = copy.deepcopy(base)
        with pytest.raises(AdaptkitError, match=r"'mha.out_proj' is a layer of the nn.MultiheadAttention 'mha'.*"
                                                r"target 'mha' itself") as err:
            attempt(model)
        assert "\n" not in str(err.value) and not adapted_layers(model)
        torch.testing.assert_close(OUT_PROJ.run(model), OUT_PROJ.run(base))  # nothing half-done


def test_matrix_counts_an_mha_out_proj_case_as_refused(tmp_path):
    row = matrix.run_case(OUT_PROJ, tmp_path)
    assert row["load"].startswith("refused: target module 'mha.out_proj'"), row
    assert matrix.status(row) == "refused"


# -- the token embedding in target_modules beside trainable_token_indices ----------------------------------
@pytest.mark.parametrize("targets, tokens", [
    (["model.embed_tokens", "q_proj"], [3, 60, 7]),
    (["embed_tokens", "q_proj"], [3, 60, 7]),
    (["model.embed_tokens", "q_proj"], {"model.embed_tokens": [3, 60, 7]}),
    (["model.embed_tokens", "q_proj"], {"embed_tokens": [3, 60, 7]}),
], ids=["full-path", "suffix", "dict-full-path", "dict-suffix"])
def test_lora_and_tokens_on_the_embedding_are_refused_as_peft(llama, targets, tokens):
    with pytest.raises(TypeError, match="trainable_token_indices cannot be applied to modules of type"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=targets, trainable_token_indices=tokens))
    model = copy.deepcopy(llama)
    with pytest.raises(AdaptkitError, match=r"model.embed_tokens: a LoRA and trainable_token_indices on the same "
                                            r"layer \(PEFT refuses it too") as err:
        ak.inject(model, "lora", r=2, target_modules=targets, trainable_token_indices=tokens)
    assert "\n" not in str(err.value) and not adapted_layers(model)


def test_peft_file_with_tokens_still_loads_with_its_logits(llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                              trainable_token_indices={"embed_tokens": [3, 9]})).eval()
        with torch.no_grad():
            pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(llama)
    ak.load_adapter(model, tmp_path)
    assert sorted(adapted_layers(model)) == sorted(["model.embed_tokens"] + [f"model.layers.{i}.self_attn.q_proj"
                                                                             for i in range(len(model.model.layers))])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, **TOL)


# -- prefix tuning on Gemma 2 / Gemma 3 -----------------------------------------------------------------------
def gemma(family: str, window: int):
    import transformers

    config_cls, model_cls = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                             "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[family]
    config = getattr(transformers, config_cls)(vocab_size=128, max_position_embeddings=64, hidden_size=32,
                                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=8, sliding_window=window)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("window", [4096, 4], ids=["wide-window", "window-4"])
def test_prefix_tuning_on_gemma_equals_peft(family, window, tmp_path):
    from peft import PrefixTuningConfig

    base = gemma(family, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    pm.eval()
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.add_(rand(*p.shape, seed=7) * 0.5)
        want, plain = pm(IDS).logits, base(IDS).logits
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    ak.load_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(IDS).logits
    assert matrix.relative(got, want) <= 1e-4 < matrix.relative(plain, want)


# -- DoRA on a grouped Conv2d: PEFT's norm is not DoRA's -------------------------------------------------------
def dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel (out × in/groups × k…) as the dense one it acts as (out × in × k…, block-diagonal)."""
    out, part = weight.shape[0], weight.shape[1]
    full = weight.new_zeros(out, part * groups, *weight.shape[2:])
    for g in range(groups):
        rows = slice(g * out // groups, (g + 1) * out // groups)
        full[rows, g * part:(g + 1) * part] = weight[rows]
    return full


@pytest.mark.parametrize("groups, channels", [(8, (16, 16)), (2, (16, 32))], ids=["groups-8", "groups-2"])
def test_grouped_conv_dora_stays_refused_peft_norm_is_not_dora(groups, channels, tmp_path):
    import torch.nn.functional as F

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(*channels, 3, padding=1, groups=groups)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["0"], use_dora=True,
                                                             init_lora_weights=False)).eval()
    layer = pm.base_model.model[0]
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    w, m, r = layer.base_layer.weight, layer.lora_magnitude_vector["default"].weight.flatten(), a.shape[0]
    x = rand(2, channels[0], 5, 5, seed=9)
    with torch.no_grad():
        delta = torch.einsum("or,rikl->oikl", dense(b, groups).flatten(1), a)  # lora_B(lora_A(·)) as one kernel
        torch.testing.assert_close(F.conv2d(x, delta, padding=1), layer.lora_B["default"](layer.lora_A["default"](x)))
        effective = dense(w, groups) + s * delta
        peft_norm = (w + s * (b.view(-1, r) @ a.view(r, -1)).reshape(w.shape)).flatten(1).norm(dim=1)
        true_norm = effective.flatten(1).norm(dim=1)
        bias = layer.base_layer.bias.view(1, -1, 1, 1)

        def dora(norm):
            return (m / norm).view(1, -1, 1, 1) * F.conv2d(x, effective, padding=1) + bias

        assert matrix.relative(pm(x), dora(peft_norm)) <= 1e-5  # PEFT's forward, written out ...
        assert matrix.relative(pm(x), dora(true_norm)) > 0.05  # ... is not DoRA's m·W_eff/‖W_eff‖
        assert float(((peft_norm - true_norm).abs() / true_norm).max()) > 0.1
    with pytest.raises(NotImplementedError, match="groups > 1"):
        copy.deepcopy(pm).merge_and_unload()
    pm.save_pretrained(tmp_path)
    with pytest.raises(AdaptkitError, match=rf"0: conv LoRA with groups={groups} and use_dora is not supported: PEFT's "
                                            r"DoRA norm") as err:
        ak.load_adapter(copy.deepcopy(base), tmp_path)
    assert "\n" not in str(err.value)
