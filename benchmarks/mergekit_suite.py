"""mergekit's own recipes through mergekit 0.1.5 and `adaptkit merge`, side by side (issue 15's yardstick).

The recipes are benchmarks/mergekit_recipes.yml: mergekit's examples/, the whole recipes in its docs
and every configuration its test suite builds, with Hub names mapped to tiny local models of the same
architecture family (built here from configs, seeded, float32; enough layers for each layer_range).
Each recipe is written once with local paths and run by both tools in this process, on the CPU:

- mergekit through its Python API: `run_merge(MergeConfiguration.model_validate(doc), out, MergeOptions())`;
  a multi-document recipe through mergekit-multi's own task graph; a MoE config through mergekit-moe's `build`;
- adaptkit through its command line, in process (`adaptkit --debug -q merge RECIPE -o OUT`, or `moe`),
  so that whatever methods, slices, tokenizers and stages adaptkit has at that moment are what runs.

Then the outputs are compared, and each recipe gets one status:

  equal             every tensor byte-identical (torch.equal, same dtype and shape), and config.json's layer
                    count, vocab size and dtype agree (and the tokenizer's vocabulary and what its chat
                    template renders of a conversation, when the recipe asks for tokenizer work);
  close             deterministic: all tensors within rtol 1e-2, atol 1e-3 but not byte-identical (the
                    detail gives the largest |difference| and where). Random methods (dare_*, della*, MoE
                    random gates), which cannot give the same bytes: same tensors, and over the whole model
                    the fraction of entries that differ from the base ("keep fraction") within 0.02 and the
                    norm of output minus base within 5 % of mergekit's;
  different         anything else (the first difference found);
  adaptkit-refused  adaptkit stopped with a one-line error (the line);
  adaptkit-crashed  anything else adaptkit raised (the traceback's last line and innermost adaptkit frame);
  mergekit-failed   mergekit cannot run the recipe, or wrote a model that lacks tensors (transformers
                    finds them missing; mergekit's own test would fail), not counted; the detail says
                    what adaptkit did.

Output: a table, the totals ("adaptkit ran N of M that mergekit runs; K byte-identical"), and with
--json PATH the table as JSON. Models are built once into benchmarks/_work/mergekit_suite/models/.

    .venv/bin/python benchmarks/mergekit_suite.py [--only ID ...] [--list] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "mergekit_recipes.yml"
WORK = ROOT / "_work" / "mergekit_suite"
# mergekit's methods that draw random numbers (Bernoulli masks); breadcrumbs, sce and ram select by magnitude.
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
KEEP_TOLERANCE = 0.02  # absolute, on the whole model's keep fraction
NORM_TOLERANCE = 0.05  # relative, on the whole model's norm of output minus base
CLOSE = dict(rtol=1e-2, atol=1e-3)
TOKENIZER_KEYS = {"tokenizer", "tokenizer_source", "chat_template"}
BUILD = 3  # raise when build_model changes what it writes: models built before are built again
STATUSES = ("equal", "close", "different", "unloadable", "adaptkit-refused", "adaptkit-crashed", "mergekit-failed")

# Tiny shapes per family (transformers config class, keyword arguments); a model's `config` overrides.
# pico*: mergekit's tests/common.py fixtures as written there.
_SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=64)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # (within the stand-ins' vocabulary)
_PICO = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _SMALL),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, num_key_value_heads=1)),
    "picollama": ("LlamaConfig", "LlamaForCausalLM", _PICO),
    "picogranite": ("GraniteConfig", "GraniteForCausalLM", dict(_PICO, num_attention_heads=2, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_head=2, n_positions=64, vocab_size=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8)),
    # arch_recipes.yml: one family for each of these mergekit architecture files
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8,
                                                      tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8,
                                                              sliding_window=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_SMALL, num_key_value_heads=1, num_local_experts=4,
                                                           num_experts_per_tok=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_SMALL, num_key_value_heads=1)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_SMALL, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_SMALL)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_SMALL)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=16, num_attention_heads=2, num_kv_heads=2,
                                                         vocab_size=128, new_decoder_architecture=True,
                                                         tie_word_embeddings=False)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_SMALL)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_SMALL, num_key_value_heads=1, sliding_window=16, **_IDS)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8, **_IDS)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(_SMALL, num_key_value_heads=1, **_IDS)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8, n_routed_experts=4,
                                                             num_experts_per_tok=2, moe_intermediate_size=16,
                                                             n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                                             topk_group=1, **_IDS)),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(_SMALL, num_key_value_heads=1, **_IDS,
                                                   layer_types=["conv", "full_attention", "conv", "full_attention"])),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_SMALL, **_IDS)),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(_SMALL, max_position_embeddings=8192, **_IDS)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(_SMALL, **_IDS)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=16, state_size=4, vocab_size=128, **_IDS)),
    # no mergekit table: it infers the architecture from transformers 5's model, whose names its table converts to
    "gte": ("GteConfig", "GteModel", dict(_SMALL, **_IDS)),
    # vision-language models: `layers` is the text decoder's (their config's top level has no layer count)
    "gemma3_vl": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=dict(_SMALL, vocab_size=300, num_key_value_heads=1, head_dim=8, sliding_window=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", dict(
        text_config=dict(_SMALL, vocab_size=300, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1], window_size=16, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=299, video_token_id=298, vision_start_token_id=297)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_SMALL, num_key_value_heads=1, head_dim=8, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=16)),
    # three deepstack mergers: mergekit's qwen3_vl table (and adaptkit's module) count them as Qwen3-VL has them
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", dict(
        text_config=dict(_SMALL, vocab_size=300, num_key_value_heads=1, head_dim=8,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                           deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=16),
        image_token_id=299, video_token_id=298, vision_start_token_id=297)),
    # encoder-decoders, merged by modules (encoder, decoder, shared): T5 v1.1's gated MLP, as mergekit's t5 table has it
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_heads=2,
                                                          feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                                          **_IDS)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", dict(
        vocab_size=128, d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[], **_IDS)),
}


@dataclass
class Recipe:
    id: str
    text: str  # as written, with mergekit's (Hub) model names
    kind: str  # merge | multi | moe
    expect: str = "runs"  # or "refused": mergekit's test expects an error
    docs: list = field(default_factory=list)

    @property
    def method(self) -> str:
        final = self.docs[-1]
        return final.get("merge_method") or f"moe/{final.get('gate_mode', 'hidden')}"

    @property
    def random(self) -> bool:
        return any(d.get("merge_method") in RANDOM_METHODS or d.get("gate_mode") == "random" for d in self.docs)

    @property
    def wants_tokenizer(self) -> bool:
        return any(TOKENIZER_KEYS & set(d) for d in self.docs)


def load_suite(path: Path = RECIPES) -> tuple[dict, dict, list[Recipe], list[dict]]:
    """(models, hub, recipes, not_run) from the recipe file; template entries filled in. LoRA adapters
    (`loras`: Hub name -> {base: a model's name, rank}) join `models` as models of kind "lora", each named
    by its Hub name."""
    data = yaml.safe_load(Path(path).read_text())
    for name, lora in (data.get("loras") or {}).items():
        data["models"][_lora_name(name)] = dict(lora, kind="lora", seed=lora.get("seed", len(name)))
        data["hub"][name] = _lora_name(name)
    recipes = []
    for entry in data["recipes"]:
        text = entry.get("recipe") or _fill(data["templates"][entry["template"]], entry["with"])
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        kind = entry.get("kind") or ("multi" if len(docs) > 1 else "moe" if "experts" in docs[0] else "merge")
        recipes.append(Recipe(entry["id"], text, kind, entry.get("expect", "runs"), docs))
    return data["models"], data["hub"], recipes, data.get("not_run", [])


def _fill(template: str, values: dict) -> str:
    """The template with each hole as YAML flow text; top-level keys left null dropped. (Not JSON: PyYAML,
    like mergekit's loader, reads JSON's 1e-05 as a string.)"""
    flow = {k: yaml.safe_dump(v, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
            for k, v in values.items()}
    doc = yaml.safe_load(template.format(**flow))
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


# ---- models ----------------------------------------------------------------------------------------

def _tokenizer(spec):
    """`chars`: one token per printable ASCII character; {vocab, added}: mergekit's tests' make_tokenizer."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    if spec == "chars":
        tokens, added = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)], []
    else:
        tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, spec["vocab"])])[:spec["vocab"]]
        added = spec["added"]
    model = {"type": "BPE", "vocab": dict(zip(tokens, range(len(tokens)))), "merges": []}
    if spec == "chars":
        model["unk_token"] = "<unk>"
    tok = tokenizers.Tokenizer.from_str(json.dumps({"version": "1.0", "model": model, "added_tokens": []}))
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(f"{tmp}/tokenizer.json")
        result = LlamaTokenizerFast(tokenizer_file=f"{tmp}/tokenizer.json")
    result.add_tokens(added)
    return result


def _lora_name(hub_name: str) -> str:
    return "lora_" + "".join(c if c.isalnum() else "_" for c in hub_name)


def build_lora(spec: dict, base_folder: Path, folder: Path) -> None:
    """A PEFT LoRA adapter (random A and B, rank `rank`, every linear layer) for the model in `base_folder`."""
    import peft
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder))
    config = peft.LoraConfig(r=spec.get("rank", 8), lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder))


def build_model(spec: dict, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    if spec["family"] == "picollava":  # tests/common.py make_picoLlaVa
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                                        num_attention_heads=2, hidden_size=64, intermediate_size=128),
            text_config=transformers.LlamaConfig(**_PICO), image_seq_length=16)
        model = transformers.LlavaForConditionalGeneration(config)
    else:
        config_class, model_class, shape = FAMILIES[spec["family"]]
        kwargs = copy.deepcopy(dict(shape, **spec.get("config", {})))
        if "layers" in spec:
            (kwargs.get("text_config") or kwargs)["n_layer" if spec["family"] == "gpt2" else "num_hidden_layers"] = \
                spec["layers"]
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    if "dtype" in spec:  # stored in another dtype (config.json says it)
        model = model.to(getattr(torch, spec["dtype"]))
    model.save_pretrained(folder, safe_serialization=True)
    if spec["family"] == "picollava":
        # transformers 5 writes Llava's older names (language_model.model.*); mergekit 0.1.5's architecture
        # table has the names transformers 4.52-4.57 write and 5 loads too (model.language_model.*), and
        # skips what it does not know: the folder gets the module's own names.
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    if spec["family"] == "gemma3_vl":
        # transformers 5 writes the SigLIP tower without its `vision_model.` level; Google's checkpoints (and
        # mergekit's gemma3vl table) have it, and transformers loads either
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    if "tokenizer" in spec:
        _tokenizer(spec["tokenizer"]).save_pretrained(folder)


def ensure_models(names, models: dict, where: Path) -> dict[str, str]:
    """Build the named models under `where` (once: a folder holding the spec it was built from is kept)."""
    paths = {}
    names = set(names) | {models[n]["base"] for n in names if models[n].get("kind") == "lora"}
    for name in sorted(names, key=lambda n: models[n].get("kind") == "lora"):  # (a LoRA's base first)
        folder = where / name
        spec = models[name]
        stamp = json.dumps(dict(spec, build=BUILD), sort_keys=True)
        if not (folder / "suite_spec.json").exists() or (folder / "suite_spec.json").read_text() != stamp:
            shutil.rmtree(folder, ignore_errors=True)
            if spec.get("kind") == "lora":
                build_lora(spec, Path(paths[spec["base"]]), folder)
            else:
                build_model(spec, folder)
            (folder / "suite_spec.json").write_text(stamp)
        paths[name] = str(folder)
    return paths


def _walk(node, visit):
    if isinstance(node, dict):
        return {k: _walk(v, visit) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, visit) for v in node]
    return visit(node) if isinstance(node, str) else node


def _parts(text: str) -> list[str]:
    """A reference's parts: `model+lora` (mergekit's LoRA syntax) is two."""
    return text.split("+") if "+" in text and "" not in text.split("+") else [text]


def model_names(recipe: Recipe, models: dict, hub: dict) -> set[str]:
    found = set()
    _walk(recipe.docs, lambda s: found.update(hub.get(p, p) for p in _parts(s) if hub.get(p, p) in models))
    return found


def localize(recipe: Recipe, hub: dict, paths: dict[str, str]) -> str:
    """The recipe's YAML with every model name (a Hub name or a local model's name, either side of a `+`)
    as its folder."""
    def local(text: str) -> str:  # (a part that is no model, such as a stage's name, stays as it is)
        parts = _parts(text)
        if not any(hub.get(p, p) in paths for p in parts):
            return text
        return "+".join(paths.get(hub.get(p, p), p) for p in parts)

    return yaml.safe_dump_all(_walk(recipe.docs, local), sort_keys=False)


# ---- the two tools ---------------------------------------------------------------------------------

def run_mergekit(recipe: Recipe, path: Path, out: Path) -> None:
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    LoaderCache.loaders.clear()  # (kept for the process by model reference: a name read again would be the old files)
    # (a `model+lora` reference needs a folder for the model with the LoRA merged in)
    options = MergeOptions(device="cpu", quiet=True, random_seed=None if recipe.kind == "multi" else 0,
                           lora_merge_cache=str(out.parent / "mergekit-lora"))
    docs = list(yaml.safe_load_all(path.read_text()))
    if recipe.kind == "moe":
        from mergekit.moe.config import MoEMergeConfig
        from mergekit.scripts.moe import build

        options.apply_global_options()  # as mergekit-moe's command does: --random-seed seeds torch's generator
        build(MoEMergeConfig.model_validate(docs[0]), str(out), options, device="cpu")
    elif recipe.kind == "multi":  # mergekit-multi's task graph, as its command runs it
        import transformers
        from mergekit.graph import Executor
        from mergekit.scripts.multimerge import load_config, make_tasks

        # Seeded once, not per stage: with --random-seed each stage's run_merge seeds torch again, so every
        # stage draws the same numbers and a later stage's DARE masks are an earlier one's (other densities
        # thinning the same uniforms): a two-stage DELLA-over-DARE recipe came out 8-12 % above its own
        # unseeded runs. Without the option (its default) the stages draw on from one another, as here.
        transformers.trainer_utils.set_seed(0)
        configs, needs = load_config(path.read_text(), str(out.parent / "mergekit-stages"))
        tasks = make_tasks(configs, needs, options, str(out.parent / "mergekit-stages"), str(out), False)
        Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc=None)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge

        run_merge(MergeConfiguration.model_validate(docs[0]), str(out), options=options)
    if not (out / "config.json").exists():
        raise RuntimeError("mergekit wrote no config.json")


def run_adaptkit(recipe: Recipe, path: Path, out: Path) -> None:
    from adaptkit.cli import cli

    # a MoE's random gates and noise come from one torch generator in both tools: the same seed, the same bytes
    command = ["moe", "--seed", "0"] if recipe.kind == "moe" else ["merge"]
    cli.main(["--debug", "-q", *command, str(path), "-o", str(out)], prog_name="adaptkit", standalone_mode=False)


def _failure(error: BaseException) -> tuple[str, str]:
    """(status, detail) for what adaptkit raised: the CLI's one line is a refusal, anything else a crash."""
    from adaptkit.cli.boundary import one_line

    line = one_line(error) if isinstance(error, Exception) else None
    if line is not None:
        return "adaptkit-refused", line
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "adaptkit" in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return "adaptkit-crashed", f"{type(error).__name__}: {error}"[:300] + where


# ---- comparing the outputs -------------------------------------------------------------------------

def load_tensors(folder: Path) -> dict:
    """The tensors of the safetensors files in `folder`, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _loaded(folder: Path) -> tuple[dict, list[str], list[str]]:
    """(state dict, the parameters transformers found missing and initialized, the tensors it had no place for)
    of the model transformers loads from `folder` (config.json's architecture). Two layouts of one model load into the same
    parameters: MoE outputs (mergekit 0.1.5 writes transformers 5's fused experts, adaptkit Mixtral's
    per-expert tensors) and Llava (older and newer names)."""
    import transformers

    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(str(folder), dtype="auto",
                                                                      output_loading_info=True)
    return ({k: v.detach() for k, v in model.state_dict().items()}, sorted(info["missing_keys"]),
            sorted(info["unexpected_keys"]))


def _loads(folder: Path) -> str:
    """Whether transformers loads a model output whole: nothing initialized at random, no tensor left over."""
    try:
        _, missing, unused = _loaded(folder)
    except Exception as error:  # noqa: BLE001 (any failure is the answer)
        return f"transformers cannot load the output: {_failure(error)[1]}"
    if missing or unused:
        return (f"transformers finds {_short(missing)} missing in the output" if missing else
                f"transformers has no place for {_short(unused)} in the output")
    return "transformers loads the output"


def _config_facts(folder: Path) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text())
    inner = config.get("text_config") or {}

    def pick(*keys):
        return next((c[k] for c in (config, inner) for k in keys if c.get(k) is not None), None)

    return {"layers": pick("num_hidden_layers", "n_layer"), "vocab_size": pick("vocab_size"),
            "dtype": pick("torch_dtype", "dtype")}


# a conversation each output's chat template renders (with and without the generation prompt): two
# templates written differently that render it alike count as the same template (no system turn: some formats refuse one)
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"}]


def _tokenizer_facts(folder: Path) -> dict:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        return {"error": type(e).__name__}
    rendered = None
    if tok.chat_template:
        try:
            rendered = [tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
                        for prompt in (False, True)]
        except Exception as e:  # noqa: BLE001 (a template that fails to render is a fact to compare too)
            rendered = f"fails to render: {type(e).__name__}: {e}"
    return {"vocab": tok.get_vocab(), "chat_template": rendered}


def compare(recipe: Recipe, ours: Path, theirs: Path, base: str | None) -> tuple[str, str]:
    """(status, detail) of adaptkit's output `ours` against mergekit's `theirs`."""
    import torch

    mine, peer = _config_facts(ours), _config_facts(theirs)
    for key in ("layers", "vocab_size", "dtype"):
        if mine[key] != peer[key]:
            # (a frankenmerge of an architecture mergekit infers, which has no layer count key: its config.json
            # keeps the donor's count)
            if key == "layers" and (facts := _loaded(theirs)) and (facts[1] or facts[2]):
                said, found = ("more", facts[2]) if facts[2] else ("fewer", facts[1])
                what = "leaves out" if facts[2] else "initializes at random"
                return "mergekit-failed", (f"mergekit's config.json says {peer[key]} layers where its tensors have "
                                           f"{said}: transformers {what} {len(found)}, {found[0]} …; {_loads(ours)}")
            return "different", f"config.json {key}: adaptkit {mine[key]}, mergekit {peer[key]}"
    if recipe.wants_tokenizer:
        mine, peer = _tokenizer_facts(ours), _tokenizer_facts(theirs)
        for key in ("error", "vocab", "chat_template"):
            if mine.get(key) != peer.get(key):
                return "different", f"tokenizer {key}: adaptkit {_short(mine.get(key))}, mergekit {_short(peer.get(key))}"
    a, m = load_tensors(ours), load_tensors(theirs)
    if recipe.kind == "moe" or a.keys() != m.keys():
        only_a, only_m = sorted(a.keys() - m.keys()), sorted(m.keys() - a.keys())
        named = f"tensors only in adaptkit: {_short(only_a)}; only in mergekit: {_short(only_m)}"
        # the same model in another layout? transformers loads both; what it finds missing it initializes
        (a, a_missing, _), (m, m_missing, _) = _loaded(ours), _loaded(theirs)
        if m_missing:  # as mergekit's own test (run_and_check_merge: "Output missing tensor") would fail
            return "mergekit-failed", (f"mergekit's output lacks {len(m_missing)} tensors of the model "
                                       f"({_short(m_missing)})")
        if a_missing:
            return "different", f"adaptkit's output lacks {_short(a_missing)}"
        if a.keys() != m.keys():
            return "different", named
    for name in m:
        if a[name].shape != m[name].shape:
            return "different", f"{name}: shape {tuple(a[name].shape)} in adaptkit, {tuple(m[name].shape)} in mergekit"
    kinds = [n for n in m if a[n].dtype != m[n].dtype]
    if kinds:
        rounded = all(torch.equal(a[n], m[n].to(a[n].dtype)) for n in kinds)
        return "different", (f"{len(kinds)}/{len(m)} tensors in another dtype, e.g. {kinds[0]}: adaptkit "
                             f"{a[kinds[0]].dtype}, mergekit {m[kinds[0]].dtype}"
                             + (" (equal once mergekit's are rounded to adaptkit's dtype)" if rounded else ""))
    unequal = [n for n in m if not torch.equal(a[n], m[n])]
    if not unequal:
        return "equal", f"{len(m)} tensors byte-identical"
    if recipe.random:
        return _compare_random(a, m, unequal, load_tensors(base) if base else {})
    worst = max(unequal, key=lambda n: (a[n].float() - m[n].float()).abs().max().item())
    diff = (a[worst].float() - m[worst].float()).abs().max().item()
    within = all(torch.allclose(a[n].float(), m[n].float(), **CLOSE) for n in unequal)
    return ("close" if within else "different"), (f"{len(unequal)}/{len(m)} tensors differ; max |Δ| {diff:.3g} "
                                                  f"in {worst}")


def _compare_random(a: dict, m: dict, names: list[str], base: dict) -> tuple[str, str]:
    """Keep fraction (entries differing from the base, in the output dtype) and norm of output - base, over
    all tensors that differ; without a base tensor of that name, of the output itself."""
    totals = {"a": [0, 0.0, 0.0], "m": [0, 0.0, 0.0]}
    count = 0
    for name in names:
        ref = base.get(name)
        for key, t in (("a", a[name]), ("m", m[name])):
            delta = t.double() - (ref.to(t.dtype).double() if ref is not None and ref.shape == t.shape else 0)
            totals[key][0] += int(delta.count_nonzero())
            totals[key][1] += float(delta.square().sum())
            totals[key][2] += float(delta.square().square().sum())
        count += m[name].numel()
    keep_a, keep_m = totals["a"][0] / count, totals["m"][0] / count
    norm_a, norm_m = totals["a"][1] ** 0.5, totals["m"][1] ** 0.5
    ratio = norm_a / norm_m if norm_m else float("inf")
    # two independent draws of k entries: their norms' ratio has a relative spread of about 1/√k (tiny
    # random MoE gates: a few hundred entries, ±6 %); 4 of those, or NORM_TOLERANCE if wider. Where a few
    # large entries carry the norm, k is less than the count: their participation ratio (Σδ²)²/Σδ⁴ (tiny
    # Mamba and GLM-4 DARE/DELLA merges: ratios 0.068 and 0.082 off, k ≈ 77-96; over 8 runs of each tool
    # the norms' spread was 3.5-5 % and their means 1 % apart): 2/√k of it, about 4 of the spreads measured
    spread = min([t[1] ** 2 / t[2] for t in totals.values() if t[2]] or [count])
    tolerance = max(NORM_TOLERANCE, 4 / max(count, 1) ** 0.5, 2 / max(spread, 1) ** 0.5)
    ok = abs(keep_a - keep_m) <= KEEP_TOLERANCE and abs(ratio - 1) <= tolerance
    return ("close" if ok else "different"), (f"random, {len(names)}/{len(m)} tensors differ: keep fraction "
                                              f"{keep_a:.3f} vs {keep_m:.3f}, norm ratio {ratio:.3f} (±{tolerance:.3f})")


def _short(value, limit: int = 120) -> str:
    text = ", ".join(value[:4]) + (f" (+{len(value) - 4})" if len(value) > 4 else "") if isinstance(value, list) \
        else (f"{len(value)} tokens" if isinstance(value, dict) else repr(value))
    return text[:limit]


# ---- one recipe, all recipes -----------------------------------------------------------------------

def run_one(recipe: Recipe, hub: dict, paths: dict[str, str], work: Path, keep: bool = False) -> dict:
    """Run `recipe` through both tools in a fresh folder under `work` (removed after, unless `keep`); the row
    of the table."""
    folder = work / recipe.id.replace("/", "_").replace(":", "_").replace("[", "_").replace("]", "")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "recipe.yml"
    path.write_text(localize(recipe, hub, paths))
    row = {"id": recipe.id, "kind": recipe.kind, "method": recipe.method}
    start = time.perf_counter()
    try:
        with _quiet():
            run_mergekit(recipe, path, folder / "mergekit")
        peer_error = None
    except (Exception, SystemExit) as e:  # noqa: BLE001 (any failure of the peer takes the recipe out)
        peer_error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    row["mergekit_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    try:
        with _quiet():
            run_adaptkit(recipe, path, folder / "adaptkit")
        ours = None
    except (Exception, SystemExit) as e:  # noqa: BLE001 (sorted by _failure)
        ours = _failure(e)
    row["adaptkit_s"] = round(time.perf_counter() - start, 2)
    if peer_error is not None:
        did = f"ran it ({_loads(folder / 'adaptkit')})" if ours is None else f"{ours[0].split('-')[1]}: {ours[1]}"
        expected = " (mergekit's test expects this error)" if recipe.expect == "refused" else ""
        row.update(status="mergekit-failed", detail=f"{peer_error}{expected}; adaptkit {did}")
    elif ours is not None:
        row.update(status=ours[0], detail=ours[1])
    else:
        base = recipe.docs[-1].get("base_model")
        base = paths.get(hub.get(base, base)) if isinstance(base, str) else None
        status, detail = compare(recipe, folder / "adaptkit", folder / "mergekit", base)
        if status in ("equal", "close") and (loads := _loads(folder / "adaptkit")) != "transformers loads the output":
            # (both tools wrote the same model, which transformers does not build whole: adaptkit should refuse)
            status, detail = "unloadable", f"{detail}, but {loads}"
        row.update(status=status, detail=detail + ("; adaptkit ran it" if status == "mergekit-failed" else ""))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


@contextlib.contextmanager
def _quiet():
    """The tools' progress bars, messages and logs (mergekit logs an ERROR for a model without a tokenizer
    and goes on) kept off the table; failures still come back as exceptions."""
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def by_kind(items) -> str:
    kinds = {}
    for item in items:
        kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def totals(rows: list[dict]) -> dict:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    peer_runs = len(rows) - counts["mergekit-failed"]
    ran = counts["equal"] + counts["close"] + counts["different"] + counts["unloadable"]
    return dict(counts, recipes=len(rows), mergekit_runs=peer_runs, adaptkit_ran=ran,
                line=f"adaptkit ran {ran} of {peer_runs} that mergekit runs; {counts['equal']} byte-identical, "
                     f"{counts['close']} close, {counts['different']} different, {counts['unloadable']} as mergekit "
                     f"but not loaded whole by transformers; {counts['adaptkit-refused']} refused, "
                     f"{counts['adaptkit-crashed']} crashed ({len(rows)} recipes, {counts['mergekit-failed']} "
                     f"that mergekit 0.1.5 cannot run)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", type=Path, default=RECIPES, metavar="PATH",
                        help="The recipe file (default: mergekit's own, mergekit_recipes.yml; wild_recipes.yml: "
                             "recipes published with merged models).")
    parser.add_argument("--only", action="append", metavar="ID", help="Run this recipe (repeatable; a substring of ids).")
    parser.add_argument("--list", action="store_true", help="List the recipes and the doc blocks not run, and exit.")
    parser.add_argument("--json", metavar="PATH", help="Write the table and totals as JSON.")
    parser.add_argument("--keep", action="store_true", help="Keep both outputs under benchmarks/_work/mergekit_suite/runs/.")
    args = parser.parse_args(argv)
    models, hub, recipes, not_run = load_suite(args.recipes)
    if args.only:
        recipes = [r for r in recipes if any(o == r.id or o in r.id for o in args.only)]
    if args.list:
        for r in recipes:
            print(f"{r.kind:5}  {r.method:16}  {r.id}")
        for item in not_run:
            print(f"(not run, {item['kind']}: {item['why']})  {item['id']}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(1)  # tiny tensors
    import adaptkit.cli  # noqa: F401  (both tools' imports out of the first recipe's seconds)
    import mergekit.merge  # noqa: F401
    paths = ensure_models(set().union(*(model_names(r, models, hub) for r in recipes)), models, WORK / "models")
    rows = []
    for recipe in recipes:
        rows.append(run_one(recipe, hub, paths, WORK / "runs", args.keep))
        r = rows[-1]
        print(f"{r['status']:17} {r['mergekit_s']:6.2f} {r['adaptkit_s']:6.2f}  {r['id']}\n{'':18}{r['detail']}", flush=True)
    summary = totals(rows)
    print(summary["line"])
    print(f"recipes by kind: {by_kind(rows)}; doc blocks not run: {by_kind(not_run)}")
    print(f"seconds in all (imports excluded, tiny models, CPU): mergekit {sum(r['mergekit_s'] for r in rows):.1f}, "
          f"adaptkit {sum(r['adaptkit_s'] for r in rows):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": summary, "recipes": rows, "not_run": not_run}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
