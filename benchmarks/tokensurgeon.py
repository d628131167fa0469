"""`adaptkit tokensurgeon` side by side with `mergekit-tokensurgeon` (mergekit 0.1.5) on the same models.

Inputs (built once into benchmarks/_work/tokensurgeon/): two BPE tokenizers trained by `tokenizers` on the
same text (the Python sources and docs of the installed packages, the first 40 MB): the model's
SentencePiece-style (`▁`, a LlamaTokenizer, 16000 tokens) and the donor's byte-level (`Ġ`, a GPT2Tokenizer,
20000 tokens), so that about half the donor's tokens are new to the model. The model is a Llama of hidden
512, 4 layers, its own LM head (bf16, N(0, 0.02)); the donor a Llama of hidden 384 with tied embeddings,
of which only the embedding is stored (all either tool reads of it). Each tool runs as its own process,
one after the other, the inputs in the page cache, measured as benchmarks/merge.py measures (wall seconds,
seconds after imports, peak RSS polled and the kernel's high-water mark). Jobs:

  omp                   mergekit's default (k 64)
  omp-k8                k 8
  common_interpolation  k 8, euclidean distances, distance-proportional weights (mergekit 0.1.5 fails on bf16
                        models: its weights stay bf16 and meet float32 rows in one bmm)
  subword               the model's tokenizer splits each new token (mean of the pieces)

The outputs are compared tensor by tensor (max |Δ|; mergekit takes the new tokens in its tokenizer's
hash order, adaptkit in id order, so batched least squares may differ in the last bits).

    .venv/bin/python benchmarks/tokensurgeon.py [--runs N] [--jobs a,b] [--device cuda]

--device cuda (on a machine with a GPU and mergekit installed) runs both tools' approximations there
(`--device cuda` is an option of both); the outputs are then compared as above.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as M  # noqa: E402  (the launcher and the measuring of benchmarks/merge.py)
from moe import tensors  # noqa: E402  (every tensor of an output folder)

WORK = M.ROOT / "_work" / "tokensurgeon"
JOBS = {"omp": [], "omp-k8": ["-k", "8"], "common_interpolation": ["-a", "common_interpolation", "-k", "8"],
        "subword": ["-a", "subword"]}


def corpus(limit: int = 40 << 20):
    """Text of the installed packages' .py, .md and .rst files, in a fixed order, up to `limit` bytes."""
    import site

    total = 0
    for root in sorted(site.getsitepackages()):
        for path in sorted(Path(root).rglob("*")):
            if path.suffix in (".py", ".md", ".rst") and path.is_file():
                text = path.read_text(errors="replace")
                total += len(text)
                yield text
                if total >= limit:
                    return


def models() -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    paths = {"model": WORK / "model", "donor": WORK / "donor"}
    if all((p / "done").exists() for p in paths.values()):
        return paths
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus(), vocab_size=16000, special_tokens=["<unk>", "<s>", "</s>"])
    model_tok = LlamaTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(corpus(), vocab_size=20000, special_tokens=["<|endoftext|>", "<|pad|>"])
    donor_tok = GPT2TokenizerFast(tokenizer_object=bl._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=len(model_tok), bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(paths["model"])
    model_tok.save_pretrained(paths["model"])
    donor = LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                        num_key_value_heads=6, vocab_size=len(donor_tok), bos_token_id=0, eos_token_id=0,
                        pad_token_id=1, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    paths["donor"].mkdir(parents=True, exist_ok=True)
    donor.save_pretrained(paths["donor"])
    embed = (torch.randn(len(donor_tok), 384, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": embed}, paths["donor"] / "model.safetensors", metadata={"format": "pt"})
    donor_tok.save_pretrained(paths["donor"])
    for p in paths.values():
        (p / "done").touch()
    return paths


def command(tool: str, paths: dict[str, Path], out: Path, args: list[str], device: str = "cpu") -> list[str]:
    args = [*args, "--device", device] if device != "cpu" else args  # (both tools' option: mergekit's MergeOptions)
    if tool == "mergekit":
        return M.stamped("from mergekit.scripts.tokensurgeon import main",
                         ["mergekit-tokensurgeon", str(paths["model"]), str(paths["donor"]), str(out), *args], "main()")
    ours = [{"-a": "--method"}.get(a, a) for a in args]
    # the imports the command makes before its work (transformers' tokenizer and Llama config modules, which
    # mergekit imports at start), so that "work" leaves them out for both tools
    modules = ("import adaptkit.merge.tokensurgeon; from transformers import AutoTokenizer; "
               "import transformers.models.llama.configuration_llama")
    return M.stamped(M.HEAVY_IMPORTS.format(modules=modules),
                     ["adaptkit", "--quiet", "tokensurgeon", str(paths["model"]), str(paths["donor"]), "-o", str(out),
                      *ours, "--force"], "sys.exit(main())")


def compare(ours: Path, theirs: Path) -> str:
    import torch

    a, m = tensors(ours), tensors(theirs)
    if a.keys() != m.keys():
        return "names differ"
    unequal = {n: float((a[n].float() - m[n].float()).abs().max()) for n in m if not torch.equal(a[n], m[n])}
    if not unequal:
        return f"{len(m)} tensors byte-identical"
    worst = max(unequal, key=unequal.get)
    return f"{len(unequal)}/{len(m)} tensors differ, max |Δ| {unequal[worst]:.3g} ({worst})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--device", default="cpu", help="both tools compute there (cuda: on a GPU machine)")
    args = parser.parse_args()
    paths = models()
    M.warm_cache(*paths.values())
    rows = []
    for job in args.jobs.split(","):
        runs = {}
        for tool in ("mergekit", "adaptkit"):
            try:
                runs[tool] = M.run_tool(tool, command(tool, paths, WORK / "out" / f"{job}-{tool}", JOBS[job], args.device),
                                        WORK / "out" / f"{job}-{tool}", args.runs)
            except M.ToolFailed as e:
                if tool == "adaptkit":
                    raise
                runs[tool] = str(e).rstrip().splitlines()[-1]  # (mergekit's common_interpolation fails on bf16)
        peer, ours = runs["mergekit"], runs["adaptkit"]
        if isinstance(peer, str):
            detail = f"mergekit fails: {peer}"
            print(f"{job:<22} adaptkit {ours.seconds:6.2f} s (work {ours.work:6.2f}, {ours.peak_mb:5.0f} MB)  {detail}",
                  flush=True)
        else:
            detail = compare(WORK / "out" / f"{job}-adaptkit", WORK / "out" / f"{job}-mergekit")
            print(f"{job:<22} mergekit {peer.seconds:6.2f} s (work {peer.work:6.2f}, {peer.peak_mb:5.0f} MB)  adaptkit "
                  f"{ours.seconds:6.2f} s (work {ours.work:6.2f}, {ours.peak_mb:5.0f} MB)  time "
                  f"{ours.seconds / peer.seconds:.3f}  RSS {ours.peak_mb / peer.peak_mb:.3f}  {detail}", flush=True)
        rows.append((job, peer, ours, detail))
    config = json.loads((WORK / "out" / f"{rows[0][0]}-adaptkit" / "config.json").read_text())
    print(f"\noutput vocab_size {config['vocab_size']}")
    print("\n| job | mergekit s | adaptkit s | time ratio | work s mergekit / adaptkit | work ratio | peak MB mergekit / "
          "adaptkit | RSS ratio | outputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job, peer, ours, detail in rows:
        if isinstance(peer, str):
            print(f"| {job} | — | {ours.seconds:.2f} | — | — / {ours.work:.2f} | — | — / {ours.peak_mb:.0f} | — | {detail} |")
            continue
        print(f"| {job} | {peer.seconds:.2f} | {ours.seconds:.2f} | {ours.seconds / peer.seconds:.3f} | "
              f"{peer.work:.2f} / {ours.work:.2f} | {ours.work / peer.work:.3f} | {peer.peak_mb:.0f} / {ours.peak_mb:.0f} "
              f"| {ours.peak_mb / peer.peak_mb:.3f} | {detail} |")
    print(f"\n(median of {args.runs})")


if __name__ == "__main__":
    main()
