"""Sharded training (FSDP2) and activation checkpointing: two FSDP processes equal one with twice the
accumulation (LoRA, DoRA, QLoRA, and VeRA and Tied-LoRA, whose tensors all blocks share); each process keeps half
the frozen base; a 2-process checkpoint
resumes in one process and a 1-process checkpoint in two; gradient checkpointing changes no number;
bf16 gathers blocks in bf16 and packed 4-bit tensors as stored; variants FSDP cannot shard are refused.

Every 2-process run is one pair of processes, made once for the module: rank 1 is a subprocess that
runs `adaptkit train` (the CLI) once per run, rank 0 this process (torchrun would set the same
variables; one subprocess kept for all runs keeps the test fast)."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.errors import AdaptkitError
from adaptkit.train.loop import train
from text_models import counting, llama_dir, write_jsonl

STEPS = 3
# clipping at 0.1 acts on every step (the gradient norm is about 0.37 at the start): the norm must be
# the whole gradient's, not one process's shard's
COMMON = dict(lr=3e-2, batch_size=3, max_steps=STEPS, max_grad_norm=0.1, progress=False)
# case -> (variant, settings, other options); qlora: the packed NF4 base split across the processes as stored
# vera, tied_lora: tensors every block shares (frozen for VeRA, trained for Tied-LoRA) stay whole on each process;
# adalora (budget masked at step 2, orthogonality loss every step), delta_lora (W moved after steps 2 and 3):
# hooks between steps that see whole tensors and write their changes back into the shards
CASES = {"lora": ("lora", dict(r=4), {}), "dora": ("lora", dict(r=4, use_dora=True), {}),
         "qlora": ("lora", dict(r=4), {"quantize": "nf4"}), "vera": ("vera", dict(r=8), {}),
         "tied_lora": ("tied_lora", dict(r=4), {}),
         "adalora": ("adalora", dict(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=STEPS), {}),
         "delta_lora": ("delta_lora", dict(r=4, start_step=1), {}),
         # the other weight-space variants: their tensors are per layer, sharded with their block
         "loha": ("loha", dict(r=4), {}), "lokr": ("lokr", dict(r=4), {}), "oft": ("oft", dict(r=0, oft_block_size=8), {}),
         "boft": ("boft", dict(boft_block_size=4), {}), "ia3": ("ia3", {}, {}), "lora_fa": ("lora_fa", dict(r=4), {}),
         "lora_plus": ("lora_plus", dict(r=4), {}), "trainable_tokens": ("trainable_tokens", dict(token_indices=[1, 2, 3]), {})}
# A collective that never completes fails after this long instead of gloo's default 30 minutes (once, in a
# full run, both processes waited in AdaLoRA's orthogonality-loss gather; every collective's order and shape
# agreed under TORCH_DISTRIBUTED_DEBUG=DETAIL, and isolated runs never hung)
COLLECTIVE_TIMEOUT_S = 240
RANK_1 = f"""import datetime, json, sys
import torch.distributed as dist
from adaptkit.cli import cli
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={COLLECTIVE_TIMEOUT_S}))
codes = []
try:
    for args in json.loads(sys.argv[1]):
        try:
            cli.main(args, prog_name="adaptkit", standalone_mode=False)
            codes.append(0)
        except SystemExit as e:  # the CLI's one-line error
            codes.append(e.code)
finally:
    dist.destroy_process_group()
print("exit codes", json.dumps(codes), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {"root": root, "llama": llama_dir(root / "llama"), "data": write_jsonl(root / "d.jsonl", counting(n=12))}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_options(options: dict) -> list[str]:
    """train()'s keyword arguments as `adaptkit train` options."""
    out = []
    for key, value in options.items():
        if key == "settings":
            out += [arg for k, v in value.items() for arg in ("--set", f"{k}={str(v).lower()}")]
        elif key == "eval_data":
            out += ["--eval", str(value)]
        elif key != "progress" and value is not False:
            out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def local_bytes(model) -> tuple[int, int]:
    """(bytes this process stores of the frozen base's parameters, bytes of the whole ones)."""
    from torch.distributed.tensor import DTensor

    assert not [n for n, _ in model.named_buffers() if ".packed_" in n]  # packed weights sharded, not kept whole
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    held = whole = 0
    for p in model.parameters():
        if not p.requires_grad:
            if names[id(p)] > 1:  # a tensor all blocks share (VeRA's projections) stays whole on each process
                assert not isinstance(p, DTensor)
                continue
            assert isinstance(p, DTensor)  # every parameter is sharded, a quantized layer's packed ones too
            held += p.to_local().untyped_storage().nbytes()
            whole += p.numel() * p.element_size()
    return held, whole


def assert_same_adapter(a_dir, b_dir):
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        # float tolerance: the processes sum the gradient (and its norm, for clipping) in another order
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def one_process(env):
    """Each case in one process with grad_accum 2 (the same global batch of 6), checkpointing at step 2."""
    runs = {}
    for case, (variant, settings, options) in CASES.items():
        runs[case] = env["root"] / f"one-{case}"
        train(env["llama"], variant, env["data"], runs[case], settings=settings, grad_accum=2, save_every=2, **options,
              **COMMON, **evaluating(case, env))
    return runs


def evaluating(case: str, env) -> dict:
    """The LoRA runs evaluate at the end: under FSDP every process takes part (the blocks are sharded)."""
    return {"eval_data": env["data"]} if case == "lora" else {}


@pytest.fixture(scope="module")
def two_processes(env, one_process):
    """Each case in two FSDP processes, then (1 -> 2) the LoRA case resumed in two processes from the
    one-process checkpoint at step 2, then a prompt-tuning run FSDP refuses; {run: (out folder, rank 0's report or
    {"error": its line}, (bytes held, bytes whole))}, and rank 1's stderr."""
    import torch.distributed as dist

    checkpointed = {"qlora": {"gradient_checkpointing": True}}  # with FSDP too it changes no number
    runs = {case: (env["root"] / f"two-{case}", {"settings": settings, "save_every": 2, **options,
                                                 **evaluating(case, env), **checkpointed.get(case, {})}, variant)
            for case, (variant, settings, options) in CASES.items()}
    runs["resumed"] = (env["root"] / "resumed-two", {"settings": CASES["lora"][1], "save_every": 2, "resume": True},
                       "lora")
    runs["refused"] = (env["root"] / "refused", {"settings": {"num_virtual_tokens": 4}}, "prompt_tuning")
    shutil.copytree(one_process["lora"] / "checkpoints" / "step-2",
                    env["root"] / ".resumed-two.training" / "checkpoints" / "step-2")
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    commands = [["-q", "train", "--base", str(env["llama"]), "--variant", variant, "--data", str(env["data"]),
                 *cli_options({**COMMON, "strategy": "fsdp", **options}), "-o", str(out)]
                for out, options, variant in runs.values()]
    proc = subprocess.Popen([sys.executable, "-c", RANK_1, json.dumps(commands)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **rendezvous, "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"})
    found = {}
    with pytest.MonkeyPatch.context() as m:
        for key, value in {**rendezvous, "RANK": "0", "LOCAL_RANK": "0"}.items():
            m.setenv(key, value)
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            for name, (out, options, variant) in runs.items():
                sizes = []

                def measure(view):
                    if view.step == 0:
                        sizes.append(local_bytes(view.model))

                try:
                    report = train(env["llama"], variant, env["data"], out, strategy="fsdp", callback=measure,
                                   **COMMON, **options)
                except AdaptkitError as e:
                    report = {"error": str(e)}
                found[name] = (out, report, sizes[0] if sizes else None)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            try:
                stdout, stderr = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:  # rank 1 waits on a collective rank 0 never reached
                proc.kill()
                stdout, stderr = proc.communicate()
    assert proc.returncode == 0 and stdout == "", stderr[-3000:]  # rank 1 writes nothing
    found["rank 1"] = stderr
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_fsdp_processes_equal_one_with_double_accumulation(case, one_process, two_processes):
    out, report, (held, whole) = two_processes[case]
    assert report["world_size"] == 2 and report["args"]["strategy"] == "fsdp"
    assert_same_adapter(one_process[case], out)
    one, two = [(folder / "adapter_model.safetensors").read_bytes() for folder in (one_process[case], out)]
    header = 8 + int.from_bytes(one[:8], "little")  # names, dtypes, shapes, offsets: rank 0 wrote the whole adapter
    assert one[:header] == two[:header] and len(one) == len(two)
    assert (one_process[case] / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()
    assert 0.45 < held / whole < 0.55  # each process keeps half the base (shards padded to equal rows)
    if case == "lora":
        single = json.loads((one_process[case] / "training.json").read_text())["metrics"]
        assert report["metrics"]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)


def test_two_process_checkpoint_resumes_in_one(env, one_process, two_processes, tmp_path):
    """2 -> 1: the FSDP checkpoint at step 2 resumes in one process with grad_accum 2."""
    variant, settings, _ = CASES["lora"]
    shutil.copytree(two_processes["lora"][0] / "checkpoints" / "step-2", tmp_path / ".one.training/checkpoints/step-2")
    steps = []
    train(env["llama"], variant, env["data"], tmp_path / "one", settings=settings, grad_accum=2, save_every=2,
          resume=True, callback=lambda view: steps.append(view.step), **COMMON)
    assert steps == [3]  # continued after step 2
    assert_same_adapter(one_process["lora"], tmp_path / "one")


def test_one_process_checkpoint_resumes_in_two(one_process, two_processes):
    """1 -> 2: the one-process checkpoint at step 2, its optimizer state resharded over two processes."""
    out, report, sizes = two_processes["resumed"]
    assert report["metrics"]["step"] == STEPS and sizes is None  # no step 0: it resumed
    assert_same_adapter(one_process["lora"], out)


def test_a_refused_run_fails_in_one_line_on_every_process_and_leaves_nothing(env, two_processes):
    out, report, _ = two_processes["refused"]
    assert report["error"].startswith("--strategy fsdp: the prompt_tuning adapter's rewrite_call") and \
        "use --strategy ddp" in report["error"]
    assert f"error: {report['error']}\n" in two_processes["rank 1"]
    codes = [0] * (len(CASES) + 1) + [1]  # every case, the resumed run, then the refused one
    assert two_processes["rank 1"].rstrip().endswith(f"exit codes {json.dumps(codes)}")
    assert not out.exists() and not (out.parent / f".{out.name}.training").exists()


def test_an_unknown_strategy_is_one_line(env, tmp_path):
    with pytest.raises(AdaptkitError, match=r"^unknown strategy 'zero3' \(known: ddp, fsdp\)$"):
        train(env["llama"], "lora", env["data"], tmp_path / "out", strategy="zero3", **COMMON)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_another_global_batch(env, one_process, tmp_path):
    work = tmp_path / ".out.training"
    shutil.copytree(one_process["lora"] / "checkpoints" / "step-2", work / "checkpoints" / "step-2")
    with pytest.raises(AdaptkitError, match=r"grad_accum × processes = 2 × 1, this run has 1 × 1"):
        train(env["llama"], "lora", env["data"], tmp_path / "out", settings=CASES["lora"][1], resume=True, **COMMON)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_checkpointing_changes_no_number(case, env, one_process, tmp_path, monkeypatch):
    """The same adapter as without it, and the blocks' forward really is checkpointed."""
    import transformers.modeling_utils as modeling  # gradient_checkpointing_enable binds its `checkpoint`

    calls = []
    original = modeling.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counted)
    variant, settings, options = CASES[case]
    train(env["llama"], variant, env["data"], tmp_path / "gc", settings=settings, grad_accum=2, save_every=2,
          gradient_checkpointing=True, **options, **COMMON)
    assert calls == [False] * (STEPS * 2 * 2)  # 2 blocks × 2 micro-batches per step, non-reentrant
    assert_same_adapter(one_process[case], tmp_path / "gc")


@pytest.fixture()
def group_of_one():
    """A process group of one (gloo), enough for fully_shard to wrap and run a model in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bf16_gathers_blocks_in_bf16_and_packed_tensors_as_stored(env, group_of_one):
    """--precision bf16: a block's parameters are gathered in bf16, a quantized layer's packed weight and
    float32 absmax exactly as stored (a bf16 absmax would change Ŵ); the sharded model computes the
    unsharded one's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import adaptkit
    from adaptkit.quant.quantized import QuantizedLinear, load_quantized
    from adaptkit.train.distributed import shard

    def qlora():
        config = AutoConfig.from_pretrained(env["llama"])
        model = load_quantized(env["llama"], AutoModelForCausalLM, config, method="nf4", dtype=torch.float32)[0]
        adaptkit.inject(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
        return model

    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = qlora()(ids).logits
    model = qlora()
    stored = {n: t.dtype for n, t in model.named_buffers() if ".base_layer.packed_" in n}
    shard(model, "bf16")
    block = model.model.layers[0]
    layer = block.self_attn.q_proj.base_layer
    assert isinstance(layer, QuantizedLinear)
    block.unshard()
    layer.unshard()
    assert block.input_layernorm.weight.dtype == torch.bfloat16
    assert block.self_attn.q_proj.branches["default"].params["lora_A"].dtype == torch.bfloat16
    gathered = {n: t.dtype for n, t in model.named_parameters()
                if n.startswith("model.layers.0.self_attn.q_proj.base_layer.packed_")}
    assert gathered and all(stored[n] == dtype for n, dtype in gathered.items())
    assert torch.float32 in gathered.values() and torch.uint8 in gathered.values()
    layer.reshard()
    block.reshard()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(ids).logits, expected, atol=0.05, rtol=0.05)


REFUSED = {  # variant -> (settings, the error)
    "prompt_tuning": (dict(num_virtual_tokens=4), r"prompt_tuning adapter's rewrite_call uses its tensors outside"),
    "prefix_tuning": (dict(num_virtual_tokens=4), r"prefix_tuning adapter's rewrite_call uses its tensors outside"),
}


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_variants_fsdp_cannot_shard_are_refused(variant, env):
    """A rewrite of the model's call uses the tensors before the sharded forward gathers them: refused in
    one line, before anything is sharded or written."""
    from transformers import AutoModelForCausalLM

    import adaptkit
    from adaptkit.errors import AdaptkitError
    from adaptkit.train.distributed import check

    settings, message = REFUSED[variant]
    model = AutoModelForCausalLM.from_pretrained(env["llama"])
    handle = adaptkit.inject(model, variant, **settings)
    with pytest.raises(AdaptkitError, match=rf"^--strategy fsdp: .*{message}.*; use --strategy ddp$"):
        check(handle, "fsdp", 2)
    check(handle, "ddp", 2)  # DDP keeps whole models: nothing to refuse
