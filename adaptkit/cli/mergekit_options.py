"""What mergekit's command-line options are here: a user who types one gets the adaptkit way in the
error line instead of click's guess by spelling (which offered --allow-pickle for --lazy-unpickle, an
option that would unpickle untrusted files, and --base for --verbose).

The options of mergekit 0.1.5's mergekit-yaml, mergekit-moe, mergekit-multi, mergekit-pytorch,
mergekit-legacy, mergekit-tokensurgeon, mergekit-layershuffle and mergekit-extract-lora (`mergekit/options.py` and its scripts) that adaptkit does not take under the same name; the ones it
does take (--allow-crimes, --unsafe-truncate-embeddings, --load-in-4bit, --load-in-8bit,
--i-understand-this-is-not-useful-without-training) are not listed.
"""
from __future__ import annotations

_READ = ("inputs are read on the CPU, and each tensor moved to --device as it is merged (memory bounded either "
         "way); drop the option")
_THREADS = "here --threads, the tensors merged side by side (torch's own threads: OMP_NUM_THREADS)"
_STAGES = ("the stages' results live in the output's temporary folder, each removed once no later stage needs "
           "it; drop the option")
_WRITES = "not needed: each tensor is written straight to its place in the output shards; drop the option"
_LOGS = "no log levels here: a progress bar and a one-line report (--json: the whole report; --debug: tracebacks)"
_OFF = "off by default here too; drop the option"

#: mergekit's MergeOptions, which every one of its merge scripts takes (adaptkit merge's answers)
SHARED = {
    "--cuda": "here --device cuda", "--gpu-rich": "here --device cuda",
    **dict.fromkeys(("--low-cpu-memory", "--read-to-gpu"), _READ),
    "--multi-gpu": "one GPU per run here (--device cuda:N); drop the option",
    "--lazy-unpickle": "tensors are always read lazily; a pickle checkpoint also needs --allow-pickle, which runs "
                       "code from the file: only for files you trust",
    "--out-shard-size": "here --shard-size, in bytes (default 2GB), where mergekit's counts parameters "
                        "(5B: about 10GB in bfloat16)",
    "--copy-tokenizer": "the output gets the tokenizer files by default (tokenizer_source / tokenizer: in the "
                        "recipe choose which); drop the option",
    "--no-copy-tokenizer": "the output always gets the tokenizer files the recipe's tokenizer settings give",
    "--clone-tensors": "not needed: every output tensor is its own copy, so a layer may repeat; drop the option",
    "--trust-remote-code": "adaptkit never runs code from a model repository; merges read only weights and "
                           "config files",
    "--random-seed": "here --seed",
    "--write-model-card": "the card (README.md) is written by default; drop the option",
    "--no-write-model-card": "here --no-card",
    "--safe-serialization": "the output is always safetensors; drop the option",
    "--no-safe-serialization": "adaptkit writes safetensors only (a pickle checkpoint can run code when loaded)",
    "-v": _LOGS, "--verbose": _LOGS,
    "-j": _THREADS, "--num-threads": _THREADS,
    **dict.fromkeys(("--async-write", "--no-async-write", "--write-threads"), _WRITES),
    "--transformers-cache": "Hub models are read from huggingface_hub's cache: set HF_HUB_CACHE (or HF_HOME)",
    "--lora-merge-cache": "not needed: a LoRA is merged into its base while the base streams, nothing is cached",
    "--lora-merge-dtype": "a LoRA is merged into its base in float32 and rounded to the base's stored dtype, as "
                          "mergekit does by default; --compute-dtype DTYPE rounds the sum to DTYPE alone (mergekit's "
                          "--lora-merge-dtype float32 with dtype: DTYPE)",
    **dict.fromkeys(("--no-allow-crimes", "--no-unsafe-truncate-embeddings", "--no-cuda", "--no-low-cpu-memory",
                     "--no-clone-tensors", "--no-trust-remote-code", "--no-lazy-unpickle", "--no-quiet", "--no-read-to-gpu",
                     "--no-multi-gpu"), _OFF),
}

#: the options of mergekit-pytorch, mergekit-multi and mergekit-legacy (whose merges are the quick form)
MERGE = {
    "-u": "here --tensors union", "--tensor-union": "here --tensors union",
    "-i": "here --tensors intersection", "--tensor-intersection": "here --tensors intersection",
    "-I": _STAGES, "--intermediate-dir": _STAGES,
    "--lazy": "every stage runs each time: no intermediate folder is kept to reuse; drop the option",
    "--no-lazy": "every stage runs each time already; drop the option",
    "--out-path": "here -o/--out",
    "--merge": "here -m PATH[:WEIGHT], once per model (the quick form)",
    "--weight": "here -m PATH:WEIGHT",
    "--density": "here --set density=D",
    "--base-model": "here --base",
    "--normalize": "here --set normalize=true", "--no-normalize": "here --set normalize=false",
    "--int8-mask": "it changes no number (--set int8_mask=true is accepted); drop the option",
    "--no-int8-mask": _OFF,
    "--bf16": "here --dtype bfloat16", "--no-bf16": "the inputs' own dtype is the default here too; drop the option",
    **dict.fromkeys(("--naive-count", "--no-naive-count"), "mergekit reads the consensus_method it sets nowhere (TIES elects "
                    "signs by the weighted sum); drop the option"),
    **dict.fromkeys(("--print-yaml", "--no-print-yaml"), "--dry-run prints the plan, and the output keeps the recipe "
                    "(adaptkit_recipe.yml); drop the option"),
}

_HIDDEN = "the hidden pass runs where --device says, the experts are copied on the CPU; drop the option"
_TORCH_THREADS = "the hidden pass uses torch's threads (OMP_NUM_THREADS); drop the option"
#: where adaptkit moe's answer to mergekit-moe's (MergeOptions) differs from adaptkit merge's
MOE = {
    "--cuda": "here --device cuda (where the hidden pass runs)", "--gpu-rich": "here --device cuda (where the hidden pass runs)",
    **dict.fromkeys(("--low-cpu-memory", "--read-to-gpu", "--multi-gpu"), _HIDDEN),
    "-j": _TORCH_THREADS, "--num-threads": _TORCH_THREADS,
    # (mergekit-moe takes these two and reads them nowhere)
    "--allow-crimes": "experts of another architecture than the base are refused (mergekit-moe takes the option "
                      "and reads it nowhere); drop it",
    "--unsafe-truncate-embeddings": "the output's embeddings are the base's, the experts' are not read (mergekit-moe "
                                    "takes the option and reads it nowhere); drop it",
}


_SURGERY_READ = "the two matrices are read on the CPU and moved to --device for the approximations; drop the option"
_SURGERY_THREADS = "the approximations use torch's threads (OMP_NUM_THREADS); drop the option"
#: mergekit-tokensurgeon's long spellings adaptkit does not take (its short ones it does), and where adaptkit tokensurgeon's answer to MergeOptions differs
TOKENSURGEON = {
    "--approximation-method": "here --method (or -a)", "--k": "here -k",
    **dict.fromkeys(("--low-cpu-memory", "--read-to-gpu"), _SURGERY_READ),
    "-j": _SURGERY_THREADS, "--num-threads": _SURGERY_THREADS,
    "--copy-tokenizer": "the output always gets the donor's tokenizer files; drop the option",
    "--no-copy-tokenizer": "the output always gets the donor's tokenizer files: the vocabulary its rows follow",
    "--trust-remote-code": "adaptkit never runs code from a model repository; tokenizers load without it",
    "--lora-merge-cache": "not needed: a LoRA given as MODEL+LORA is merged into the model while it is read",
    **dict.fromkeys(("--allow-crimes", "--unsafe-truncate-embeddings"),
                    "mergekit-tokensurgeon takes the option and reads it nowhere; drop it"),
    **dict.fromkeys(("--write-model-card", "--no-write-model-card"), "mergekit-tokensurgeon writes no card whatever "
                    "this says; adaptkit writes one unless --no-card"),
}
#: mergekit-layershuffle's own options adaptkit layershuffle does not take
LAYERSHUFFLE = {
    "-w": "here -m PATH:WEIGHT", "--weight": "here -m PATH:WEIGHT",
    **dict.fromkeys(("--print-yaml", "--no-print-yaml"), "--dry-run prints the recipe, --write-yaml PATH keeps it, and the "
                    "output's card keeps it (adaptkit_recipe.yml)"),
    "--fp16": "here --dtype float16", "--no-fp16": "the inputs' own dtype is the default here too; drop the option",
    "--no-full-random": _OFF,
    **dict.fromkeys(("--cuda", "--device", "--gpu-rich", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu"),
                    "every layer is copied as it is (passthrough): there is nothing to compute on a GPU; drop the option"),
}
_EXTRACT_ALL = "every changed matrix is factored (vectors, and embeddings unless --embed-lora, saved whole); drop the option"
_EXTRACT_SAME = "the fine-tune and the base must hold the same tensors in the same shapes here; drop the option"
_EXTRACT_PLAIN = "extract reads plain models (a folder or a Hub name, no MODEL+LORA); drop the option"
#: mergekit-extract-lora's options adaptkit extract does not take, and where its answer to MergeOptions differs
EXTRACT = {
    "--base-model": "here --base", "--out-path": "here -o/--out",
    "--max-rank": "here --rank (every module's rank; --energy picks each module's instead)",
    "--sv-epsilon": "here --energy, the share of Σσ² each module keeps (singular values at float32 round-off are "
                    "dropped already)",
    **dict.fromkeys(("--distribute-scale", "--no-distribute-scale"), "the singular values are split between A = √S·Vᵀ "
                    "and B = U·√S already (lora_alpha = rank: scale 1); drop the option"),
    "--no-embed-lora": "embeddings and the output head are saved whole by default; drop the option",
    **dict.fromkeys(("--save-module", "-e", "--exclude-regex", "-i", "--include-regex", "--skip-undecomposable"),
                    _EXTRACT_ALL),
    **dict.fromkeys(("--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings",
                     "--no-unsafe-truncate-embeddings"), _EXTRACT_SAME),
    **dict.fromkeys(("--lora-merge-cache", "--lora-merge-dtype"), _EXTRACT_PLAIN),
    **dict.fromkeys(("--low-cpu-memory", "--read-to-gpu"), "each ΔW is read on the CPU and moved to --device to be "
                    "factored; drop the option"),
    "--out-shard-size": "the adapter is one file (adapter_model.safetensors); drop the option",
    **dict.fromkeys(("--copy-tokenizer", "--no-copy-tokenizer"), "an adapter folder holds no tokenizer; drop the option"),
    "--trust-remote-code": "adaptkit never runs code from a model repository; extract reads only weights and config files",
    "--random-seed": "nothing is drawn at random (each ΔW gets a full SVD); drop the option",
    **dict.fromkeys(("--write-model-card", "--no-write-model-card"), "the adapter folder gets PEFT's files only; drop "
                    "the option"),
    **dict.fromkeys(("-j", "--num-threads"), "the SVDs use torch's threads (OMP_NUM_THREADS); drop the option"),
}
COMMANDS = {"merge": MERGE, "moe": MOE, "tokensurgeon": TOKENSURGEON, "layershuffle": LAYERSHUFFLE, "extract": EXTRACT}


def hint(option: str, command: str) -> str | None:
    """The line for mergekit's `option` (as typed: `--cuda`, `-j`) given to adaptkit's `command` (a key of
    COMMANDS), or None for an option mergekit's matching scripts lack."""
    option = option.split("=", 1)[0]
    return COMMANDS[command].get(option, SHARED.get(option))
