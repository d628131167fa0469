"""LoRA on `nn.MultiheadAttention` and on parameters (`target_parameters`, PEFT's ParamWrapper).

PEFT is the oracle: the cases of its `tests/test_custom_models.py` (ModelMha, MlpUsingParameters)
and a MoE-style block of stacked experts (3-D parameters, PEFT's default layout and
`is_transposed`; two parameters of one module, which PEFT nests in registration order) are created
by PEFT with random factors, merged by adaptkit into the saved base and compared with PEFT's forward
and `merge_and_unload`; loaded onto a live model (PEFT's forward, merge, unmerge, save → PEFT reads
it, merge_and_unload); injected by adaptkit, saved, and read by PEFT; adaptkit writes an MHA adapter
and PEFT loads it. The formulas are written out: ΔW = s·B·A
on `in_proj_weight` (3E × E); PEFT's out_proj ΔW counted twice (its forward and merge both add it
twice: huggingface/peft PR #3774); per expert ΔP[e] = s·B[:, e::E]·A[e·r:(e+1)·r] (transposed for
`is_transposed`; square experts take the layout of the base's model_type, as gpt-oss's real layers do). What
adaptkit cannot do is refused in one line naming it.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.files.convert import convert
from adaptkit.merge.engine import run_merge

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
REL = 1e-4


class ModelMha(nn.Module):  # PEFT's tests/test_custom_models.py
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x, _ = self.mha(x, x, x)
        return self.lin0(x)


class LinearUsingParameter(nn.Module):  # PEFT's _LinearUsingParameter: W stored in × out
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = LinearUsingParameter(10, 20), LinearUsingParameter(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Experts(nn.Module):
    """A MoE block's experts as stacked parameters (transformers' layout: E × hidden × 2·inner and
    E × inner × hidden), every token through every expert; `is_transposed` as PEFT reads it."""

    def __init__(self, n=3, hidden=6, inner=4, transposed=False, down_first=False):
        super().__init__()
        self.is_transposed = transposed
        shapes = {"gate_up_proj": (n, hidden, 2 * inner), "down_proj": (n, inner, hidden)}
        for name in sorted(shapes, reverse=not down_first):  # registration order: PEFT's nesting order
            setattr(self, name, nn.Parameter(torch.randn(*shapes[name]) / 3))

    def forward(self, x):  # x: tokens × hidden
        h = torch.einsum("th,ehk->etk", x, self.gate_up_proj)
        gate, up = h.chunk(2, dim=-1)
        return torch.einsum("eti,eih->th", torch.relu(gate) * up, self.down_proj)


class MoE(nn.Module):
    def __init__(self, transposed=False, down_first=False):
        super().__init__()
        self.experts = Experts(transposed=transposed, down_first=down_first)

    def forward(self, x):
        return self.experts(x)


class Router(nn.Module):
    """transformers 5's MoE router: a `weight` parameter (experts × hidden), not an nn.Linear."""

    def __init__(self, n=3, hidden=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, hidden) / 3)

    def forward(self, x):
        return x @ self.weight.T


class RoutedMoE(nn.Module):
    """A transformers 5 MoE block as PEFT's all-linear adapts it: the linear layers by target_modules, the
    router by `gate.weight`, the stacked experts by their bare names (`gate_up_proj`, `down_proj`), which
    match a parameter of that name in any module."""

    def __init__(self):
        super().__init__()
        self.proj, self.gate, self.experts = nn.Linear(6, 6), Router(), Experts()

    def forward(self, x):
        x = self.proj(x)
        return self.experts(x) * torch.softmax(self.gate(x), dim=-1).max(dim=-1, keepdim=True).values


# (id, model, input, PEFT LoraConfig arguments); the first four are PEFT's own TEST_CASES rows.
CASES = [
    ("MHA 1 LoRA", ModelMha, (3, 1, 10), {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", ModelMha, (3, 1, 10), {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", MlpUsingParameters, (3, 10), {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", Mlp, (3, 10), {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    ("MHA rank and alpha patterns", ModelMha, (3, 1, 10),
     {"target_modules": ["mha", "lin0"], "r": 4, "rank_pattern": {"mha": 3}, "alpha_pattern": {"mha": 5}}),
    ("MHA rsLoRA", ModelMha, (3, 1, 10), {"target_modules": ["mha"], "r": 4, "lora_alpha": 6, "use_rslora": True}),
    ("experts gate_up_proj", MoE, (5, 6), {"target_parameters": ["experts.gate_up_proj"], "r": 2}),
    ("experts down_proj rank_pattern", MoE, (5, 6),
     {"target_parameters": ["down_proj"], "r": 2, "rank_pattern": {"down_proj": 3}, "lora_alpha": 5}),
    ("experts is_transposed rsLoRA", lambda: MoE(transposed=True), (5, 6),
     {"target_parameters": ["experts.gate_up_proj"], "r": 2, "use_rslora": True}),
    # two parameters of one module: PEFT nests their wrappers in an order its file does not record
    ("experts gate_up_proj and down_proj nested", MoE, (5, 6),
     {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 2, "rank_pattern": {"down_proj": 3},
      "alpha_pattern": {"gate_up_proj": 5}}),
    ("experts nested the other way round", lambda: MoE(down_first=True), (5, 6),
     {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 3, "rank_pattern": {"gate_up_proj": 2}}),
    # PEFT 0.21's all-linear on a transformers 5 Mixtral writes these (a bare name matches any module's parameter
    # of that name: `mlp.gate` holds one wrapper, its `weight`; adaptkit once refused the file)
    ("router, experts and a layer as all-linear on a MoE", RoutedMoE, (5, 6),
     {"target_modules": ["proj"], "target_parameters": ["gate.weight", "gate_up_proj", "down_proj"], "r": 2}),
]


def save_base(model: nn.Module, folder) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def run(model, x):
    with torch.no_grad():
        y = model(x)
    return y[0] if isinstance(y, tuple) else y  # MultiheadAttention models: (output, weights)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    """PEFT's adapter (random factors) saved, the base saved, PEFT's output and merged weights."""
    _, build, shape, kwargs = request.param
    folder = tmp_path_factory.mktemp("case")
    torch.manual_seed(0)
    base = build().eval()
    save_base(base, folder / "base")
    config = LoraConfig(init_lora_weights=False, **{"target_modules": [], **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(folder / "adapter")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = run(peft_model, x)
    with torch.no_grad():
        merged = copy.deepcopy(peft_model).merge_and_unload()
    return base, folder, x, out, {k: v.detach() for k, v in merged.state_dict().items()}


def test_merge_into_the_saved_base_equals_peft(case, tmp_path):
    base, folder, x, out, merged = case
    run_merge({"base_model": str(folder / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(folder / "adapter"), "parameters": {"weight": 1.0}}]}, tmp_path / "m",
              progress=False)
    ours = load_file(tmp_path / "m" / "model.safetensors")
    assert sorted(ours) == sorted(merged)
    changed = [k for k in merged if not torch.equal(merged[k], base.state_dict()[k])]
    assert changed  # the adapter changes something, so equality below means something
    for key in merged:
        assert rel(ours[key], merged[key]) < REL, key
    model = copy.deepcopy(base)
    model.load_state_dict(ours)
    assert rel(run(model, x), out) < REL


def test_live_load_merge_unmerge_save_equal_peft(case, tmp_path):
    """Loaded live: PEFT's forward; merged and unmerged in place; saved, PEFT reads the same forward;
    merge_and_unload gives PEFT's merged weights."""
    base, folder, x, out, merged = case
    assert rel(run(base, x), out) > 1e-3  # the adapter changes the output, so equality below means something
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, folder / "adapter")
    assert rel(run(model, x), out) < REL
    handle.merge()
    assert rel(run(model, x), out) < REL
    handle.unmerge()
    assert rel(run(model, x), out) < REL
    with handle.disabled():
        assert rel(run(model, x), run(base, x)) < 1e-6
    handle.save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert rel(run(loaded, x), out) < REL
    unloaded = handle.merge_and_unload().state_dict()
    assert sorted(unloaded) == sorted(merged)
    for key in merged:
        assert rel(unloaded[key], merged[key]) < REL, key


# (id, model, input, adaptkit inject arguments): the adapter adaptkit creates, PEFT reads.
INJECTED = [
    ("mha", ModelMha, (3, 1, 10), {"target_modules": ["mha"], "r": 3, "lora_alpha": 5}),
    ("mha and linear rsLoRA", ModelMha, (3, 1, 10), {"target_modules": ["mha", "lin0"], "r": 4, "use_rslora": True,
                                                    "rank_pattern": {"mha": 2}}),
    ("parameter", MlpUsingParameters, (3, 10), {"target_modules": [], "target_parameters": ["lin0.weight"], "r": 2}),
    ("experts nested", MoE, (5, 6), {"target_modules": [], "target_parameters": ["gate_up_proj", "down_proj"], "r": 2,
                                     "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"gate_up_proj": 5}}),
    ("experts is_transposed", lambda: MoE(transposed=True), (5, 6),
     {"target_modules": [], "target_parameters": ["experts.gate_up_proj"], "r": 2}),
    ("layer and parameter", Mlp, (3, 10), {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]


@pytest.mark.parametrize("build, shape, kwargs", [row[1:] for row in INJECTED], ids=[row[0] for row in INJECTED])
def test_injected_adapter_trains_saves_and_peft_reads_it(build, shape, kwargs, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "lora", init_lora_weights=False, **kwargs)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours = run(model, x)
    assert rel(ours, run(base, x)) > 1e-3
    y = model(x)
    (y[0] if isinstance(y, tuple) else y).square().sum().backward()  # through the substituted tensors
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in handle.parameters())
    handle.save(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert rel(run(loaded, x), ours) < REL
    with torch.no_grad():
        peft_merged = copy.deepcopy(loaded).merge_and_unload().state_dict()
    unloaded = handle.merge_and_unload().state_dict()
    for key in peft_merged:
        assert rel(unloaded[key], peft_merged[key]) < REL, key


def test_mha_live_formula_written_out():
    """Live: in_proj_weight + s·B·A and out_proj.weight + 2·s·B·A (PEFT's count), from the branch's own factors."""
    torch.manual_seed(0)
    base = ModelMha().eval()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "lora", target_modules=["mha"], r=3, lora_alpha=5, init_lora_weights=False)
    params = dict(handle.parameters())
    s = 5 / 3
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected.mha.in_proj_weight += s * params["mha.lora_B"] @ params["mha.lora_A"]
        expected.mha.out_proj.weight += 2 * s * params["mha.out_proj/lora_B"] @ params["mha.out_proj/lora_A"]
    x = torch.randn(4, 2, 10)
    assert rel(run(model, x), run(expected, x)) < 1e-6
    assert rel(run(model, x), run(base, x)) > 1e-3


def test_mha_formula_written_out(tmp_path):
    """in_proj_weight + s·B·A, out_proj.weight + 2·s·B·A: PEFT's forward, which trained the adapter."""
    torch.manual_seed(0)
    base = ModelMha().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha"], r=3, lora_alpha=5,
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a_in, b_in = (tensors[f"base_model.model.mha.lora_{r}.weight"] for r in "AB")
    a_out, b_out = (tensors[f"base_model.model.mha.base_layer.out_proj.lora_{r}.weight"] for r in "AB")
    s = 5 / 3
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected.mha.in_proj_weight += s * b_in @ a_in
        expected.mha.out_proj.weight += 2 * s * b_out @ a_out
    x = torch.randn(4, 2, 10)
    assert rel(run(expected, x), run(peft_model, x)) < REL  # PEFT's forward is the written-out formula
    adapter = read_adapter(tmp_path)
    lora = ak.registry.get("variant", "lora")
    assert rel(lora.delta(adapter, "mha"), s * b_in @ a_in) < 1e-6
    assert rel(lora.delta(adapter, "mha.base_layer.out_proj"), 2 * s * b_out @ a_out) < 1e-6


def test_experts_formula_written_out(tmp_path):
    """ΔP[e] = s·B_e·A_e with A_e = A[e·r:(e+1)·r] and B_e = B[:, e::E] (PEFT reshapes B to out × r × E)."""
    torch.manual_seed(0)
    base = MoE().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=[], target_parameters=["gate_up_proj"],
                                                                r=2, lora_alpha=3, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a, b = (tensors[f"base_model.model.experts.lora_{r}.weight"] for r in "AB")
    n, r, s = 3, 2, 3 / 2
    assert a.shape == (n * r, 8) and b.shape == (6, n * r)
    expected = torch.stack([s * b[:, e::n] @ a[e * r:(e + 1) * r] for e in range(n)])
    merged = copy.deepcopy(peft_model).merge_and_unload().experts.gate_up_proj.detach()
    assert rel(merged - base.experts.gate_up_proj.detach(), expected) < 1e-5  # PEFT agrees
    adapter = read_adapter(tmp_path)
    assert list(adapter.modules) == ["experts.gate_up_proj"]
    lora = ak.registry.get("variant", "lora")
    assert lora.module_rank(adapter, "experts.gate_up_proj") == r
    got = lora.delta(adapter, "experts.gate_up_proj", base.experts.gate_up_proj.detach())
    assert rel(got, expected) < 1e-6


def test_adaptkit_writes_mha_adapter_peft_loads(tmp_path):
    torch.manual_seed(0)
    base = ModelMha().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha", "lin0"], r=4,
                                                                alpha_pattern={"mha": 3}, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "a")
    convert(tmp_path / "a", "peft", tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    x = torch.randn(3, 2, 10)
    assert rel(run(loaded, x), run(peft_model, x)) < REL


class ModelMhaKdim(nn.Module):  # key/value of another width: no packed in_proj_weight (PEFT refuses it too)
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2, kdim=6, vdim=6)


@pytest.mark.parametrize("build, kwargs, fragment", [
    (ModelMha, {"target_modules": ["mha"], "use_dora": True}, "mha: use_dora on a LoRA of tensors the module reads itself"),
    (ModelMha, {"variant": "delta_lora", "target_modules": ["mha"]}, "mha: delta_lora adapts linear layers only"),
    (ModelMha, {"target_modules": ["mha"], "init_lora_weights": "pissa"}, "mha: init_lora_weights='pissa' on a LoRA"),
    (ModelMhaKdim, {"target_modules": ["mha"]}, "target module 'mha' is a MultiheadAttention"),
    (MlpUsingParameters, {"target_modules": [], "target_parameters": ["lin2.weight"]},
     "target_parameters ['lin2.weight'] match no parameter"),
    (Mlp, {"target_modules": ["lin1"], "target_parameters": ["lin1.weight"]},
     "'lin1' is targeted both as a layer and through its tensors"),
], ids=["mha-dora", "mha-delta-lora", "mha-pissa", "mha-kdim", "parameter-missing", "layer-and-its-parameter"])
def test_what_cannot_be_injected_is_refused_by_name(build, kwargs, fragment):
    torch.manual_seed(0)
    model = build()
    with pytest.raises(AdaptkitError) as err:
        ak.inject(model, kwargs.get("variant", "lora"), **{k: v for k, v in kwargs.items() if k != "variant"})
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not any("branches" in n for n, _ in model.named_modules())  # nothing was wrapped


def test_quantization_aware_training_refused_on_tensors():
    model = ModelMha()
    handle = ak.inject(model, "lora", target_modules=["mha"])
    with pytest.raises(AdaptkitError, match="mha: an adapter on tensors the module reads itself"):
        handle.quantization_aware("nf4")


def test_parameter_adapter_has_no_adapter_output(tmp_path):
    torch.manual_seed(0)
    get_peft_model(MlpUsingParameters(), LoraConfig(target_modules=[], target_parameters=["lin0.weight"],
                                                    init_lora_weights=False)).save_pretrained(tmp_path / "a")
    with pytest.raises(AdaptkitError) as err:
        convert(tmp_path / "a", "peft", tmp_path / "b")
    assert "(a LoRA on a parameter (target_parameters) has no form in adaptkit's adapter outputs" in str(err.value)


def test_square_experts_load_live_as_peft(tmp_path):
    """Square experts: a file does not say is_transposed (merges take it from the base's model_type, or refuse
    it without one, below), but a live model does, and PEFT reads it there too."""
    torch.manual_seed(0)
    for transposed in (False, True):
        base = block(w=(3, 4, 4))
        base.block.is_transposed = transposed
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=[], target_parameters=["block.w"],
                                                                    r=2, init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / str(transposed))
        model = copy.deepcopy(base)
        ak.load_adapter(model, tmp_path / str(transposed)).merge()
        with torch.no_grad():
            want = copy.deepcopy(peft_model).merge_and_unload().block.w
        assert rel(model.block.w.detach(), want) < REL and rel(want, base.block.w.detach()) > 1e-3


def block(**shapes) -> nn.Module:
    """A model whose submodule `block` holds parameters of the given shapes (PEFT needs them below the top)."""
    model = nn.Module()
    model.block = nn.Module()
    for name, shape in shapes.items():
        setattr(model.block, name, nn.Parameter(torch.randn(*shape)))
    return model


@pytest.mark.parametrize("name, model, targets, fragment, live_fragment", [
    # square experts do not show PEFT's layout (is_transposed) in their shapes
    ("square", lambda: block(w=(3, 4, 4)), ["block.w"], "square experts (4 × 4)", None),
    # two nested wrappers that both fit either parameter: which is whose is unknown
    ("twins", lambda: block(p=(5, 6), q=(5, 6)), ["block.p", "block.q"], "2 of the 2 LoRA(s) on parameters of 'block' "
     "fit its tensor [5, 6] at rank 2; which is its own", "do not pair one-to-one with its parameters ['p', 'q']"),
    # a PEFT newer than 0.21.2 may count a MultiheadAttention's out_proj ΔW once
    ("mha", ModelMha, None, "MultiheadAttention LoRA from PEFT 0.22.0", "MultiheadAttention LoRA from PEFT 0.22.0"),
], ids=["square-experts", "twin-parameters", "newer-peft-mha"])
def test_what_shapes_cannot_settle_is_refused(name, model, targets, fragment, live_fragment, tmp_path):
    torch.manual_seed(0)
    model = model()
    config = LoraConfig(target_modules=["mha"], init_lora_weights=False) if targets is None else \
        LoraConfig(target_modules=[], target_parameters=targets, r=2, init_lora_weights=False)
    save_base(model, tmp_path / "base")
    get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / "adapter")
    if name == "mha":
        path = tmp_path / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "peft_version": "0.22.0"}))
    with pytest.raises(AdaptkitError) as err:
        run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
                   "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}]}, tmp_path / "m",
                  progress=False)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    if name == "square":  # a live model says is_transposed (test_square_experts_load_live_as_peft)
        return
    with pytest.raises(AdaptkitError) as err:
        ak.load_adapter(copy.deepcopy(model), tmp_path / "adapter")
    assert live_fragment in str(err.value) and "\n" not in str(err.value)


def test_a_variant_without_tensor_targets_refuses_an_adapted_attention():
    model = ModelMha()
    ak.inject(model, "lora", target_modules=["mha"])
    with pytest.raises(AdaptkitError, match="mha: ia3 adapters cannot go on tensors the module reads itself"):
        ak.inject(model, "ia3", name="b", target_modules=["mha"], feedforward_modules=[])


def test_two_adapters_on_one_attention_sum_and_switch():
    """Two LoRAs on one MultiheadAttention: each alone, both summed (ΔW_a + ΔW_b), and merged = unmerged."""
    torch.manual_seed(0)
    base = ModelMha().eval()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "lora", name="a", target_modules=["mha"], r=2, init_lora_weights=False)
    ak.inject(model, "lora", name="b", target_modules=["mha"], r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(3, 2, 10)
    expected = copy.deepcopy(base)
    for name, s in (("a", 8 / 2), ("b", 6 / 3)):
        p = dict(handle.parameters(name))
        with torch.no_grad():
            expected.mha.in_proj_weight += s * p["mha.lora_B"] @ p["mha.lora_A"]
            expected.mha.out_proj.weight += 2 * s * p["mha.out_proj/lora_B"] @ p["mha.out_proj/lora_A"]
    handle.set_active(["a", "b"])
    both = run(model, x)
    assert rel(both, run(expected, x)) < 1e-6
    handle.merge()
    assert rel(run(model, x), both) < 1e-6
    handle.unmerge()
    handle.set_active("a")
    assert rel(run(model, x), both) > 1e-3
    handle.remove()
    assert rel(run(model, x), run(base, x)) < 1e-6


@pytest.mark.parametrize("build, shape, kwargs", [
    (ModelMha, (3, 1, 10), {"target_modules": ["mha"], "r": 2}),
    (MoE, (5, 6), {"target_modules": [], "target_parameters": ["gate_up_proj", "down_proj"], "r": 2}),
], ids=["mha", "experts"])
def test_hot_swap_takes_the_new_factors(build, shape, kwargs, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    x = torch.randn(*shape)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs)).eval()
        peft_model.save_pretrained(tmp_path / str(seed))
        outs.append(run(peft_model, x))
    model = copy.deepcopy(base)
    ak.load_adapter(model, tmp_path / "1")
    assert rel(run(model, x), outs[0]) < REL
    ak.load_adapter(model, tmp_path / "2", swap=True)
    assert rel(run(model, x), outs[1]) < REL and rel(outs[0], outs[1]) > 1e-3


def peft_and_ours(model, config: LoraConfig, tmp_path) -> tuple[dict, dict, dict]:
    """PEFT's adapter on `model` (whose base is saved in tmp_path/base) saved to tmp_path/lora; the tensors of
    adaptkit's merge of base+lora, of PEFT's merge_and_unload saved by transformers, and of the base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "lora")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft")
    run_merge({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{tmp_path / 'base'}+{tmp_path / 'lora'}", "parameters": {"weight": 1.0}}]}, tmp_path / "out",
        progress=False)
    return tuple(load_file(tmp_path / folder / "model.safetensors") for folder in ("out", "peft", "base"))


def test_stacked_expert_lora_merges_into_a_per_expert_checkpoint_as_peft(tmp_path):
    """PEFT's all-linear on a transformers 5 Mixtral adapts its experts stacked (`mlp.experts.gate_up_proj`,
    `down_proj`) and its router (`mlp.gate.weight`), while the checkpoint stores each expert's matrices
    (`block_sparse_moe.experts.0.w1.weight`, w2, w3) and `block_sparse_moe.gate.weight`: each stored tensor
    gets its part of its expert's ΔP (w1 and w3 the two halves of gate_up_proj's rows), equal to PEFT's
    merge_and_unload saved by transformers. (adaptkit refused this once, as "an adapter for a different base?")"""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                                        num_hidden_layers=2, vocab_size=32, num_local_experts=3, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base")
    ours, theirs, base = peft_and_ours(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
                                       tmp_path)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_parameters"]
    assert sorted(ours) == sorted(theirs) and "model.layers.0.block_sparse_moe.experts.2.w3.weight" in ours
    for name in ("block_sparse_moe.experts.1.w1.weight", "block_sparse_moe.experts.2.w3.weight",
                 "block_sparse_moe.experts.0.w2.weight", "block_sparse_moe.gate.weight", "self_attn.q_proj.weight"):
        assert not torch.equal(theirs[f"model.layers.1.{name}"], base[f"model.layers.1.{name}"]), name  # (adapted)
    for name in theirs:
        assert rel(ours[name], theirs[name]) < REL, name


@pytest.mark.parametrize("kind", ["gpt_oss", "mixtral"])
def test_square_experts_take_the_layout_of_the_base_models_type(kind, tmp_path):
    """Square stacked experts (hidden = intermediate, so `down_proj` is E × d × d) do not show in their shapes
    how PEFT saw them. The base's model_type does: gpt-oss stores its experts in × out (transformers marks them
    `is_transposed`, and PEFT's ΔP[e] is (s·B_e·A_e)ᵀ), Mixtral out × in. Either merge equals PEFT's
    merge_and_unload saved by transformers; without the model_type it is refused (test above)."""
    import transformers

    torch.manual_seed(0)
    shape = {"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
             "num_hidden_layers": 2, "vocab_size": 32, "num_local_experts": 3, "num_experts_per_tok": 2}
    if kind == "gpt_oss":
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(head_dim=8, **shape))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**shape))
    model.save_pretrained(tmp_path / "base")
    model = type(model).from_pretrained(tmp_path / "base")
    assert model.model.layers[0].mlp.experts.down_proj.shape[1:] == (16, 16)
    assert getattr(model.model.layers[0].mlp.experts, "is_transposed", False) == (kind == "gpt_oss")
    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                           "mlp.experts.down_proj"],
                        init_lora_weights=False)
    ours, theirs, base = peft_and_ours(model, config, tmp_path)
    assert sorted(ours) == sorted(theirs)
    down = [k for k in theirs if k.endswith(("down_proj", "w2.weight"))]
    assert down and all(not torch.equal(theirs[k], base[k]) for k in down)  # (adapted)
    for name in theirs:
        assert rel(ours[name], theirs[name]) < REL, name
    for name in down:  # the other layout would be wrong: the experts' ΔP transposed
        delta = theirs[name] - base[name]
        assert rel(base[name] + delta.transpose(-1, -2), theirs[name]) > 0.1


def test_experts_that_contradict_the_base_models_type_are_refused(tmp_path):
    """Experts whose LoRA factors fit only the layout the base's model_type does not store (PEFT saw them
    `is_transposed`, the config says Mixtral): the type's table would be wrong, square experts with it too."""
    torch.manual_seed(0)
    model = MoE(transposed=True)
    save_base(model, tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj"],
                                                    r=2, init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdaptkitError) as err:
        run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
                   "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}}]}, tmp_path / "m",
                  progress=False)
    assert "experts.gate_up_proj: its LoRA factors do not fit experts stored out × in, as mixtral models" \
        in str(err.value) and "\n" not in str(err.value)
