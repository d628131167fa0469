"""A model with another model's tokenizer (`adaptkit tokensurgeon`, mergekit-tokensurgeon's job).

The output is the model with the donor's vocabulary: its input embedding and LM head get one row per
donor token id, in the donor's order; every other tensor is the model's. A donor token the model also
has keeps the model's row. Tokens are compared after normalizing the word-start marker (SentencePiece's
`▁` and byte-level BPE's `Ġ` both mean "starts a word") and special tokens by their role (the donor's
BOS takes the model's BOS row whatever their texts): mergekit's rules. With `--byte-match`, a one-byte
character and its `<0xNN>` byte token stand for each other; with `--prefix-match`, a token takes the row
of its longest prefix the model has. The rest are approximated (`token_approx`) from the tokens both
vocabularies share; `--magikarp` first drops the tokens either model has barely trained, and zeroes
the donor tokens neither trained. Token-indexed biases keep the model's value where it has the token,
else 0. config.json says the donor's vocabulary size and takes its special token ids; the donor's
tokenizer files are copied as they are.

Differences from mergekit-tokensurgeon 0.1.5, each where mergekit's result depends on hash order or is
lost: additional special tokens are keyed by their text under any transformers version (transformers 4
lists them in `special_tokens_map`, where mergekit gives all of them one key, so one survives, chosen by
hash order, and the rest get zero rows); two tokens with one key keep the lower id; the tokens to
approximate are taken in donor id order (mergekit takes the tokenizer's hash order, so its random draws
go to other tokens from run to run, and least-squares weights differ in the last bits). Where mergekit
fails or writes wrong rows, at the function that differs (`token_approx`, `SurgeryOptions.allows`): bf16
common_interpolation, stb, mp_rope's configs, k past OMP's width, weighted_mean's order, the matches'
embed/lm_head.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..devices import compute_device
from ..errors import AdaptkitError
from ..io import readers
from ..io.dtypes import torch_to_code
from ..io.outputs import atomic_output, check_output
from ..io.writer import DEFAULT_SHARD_SIZE, ShardedWriter
from . import token_approx as ta
from .embeddings import set_vocab_size
from .refs import Ref
from .sources import ModelSource, open_input
from .token_keys import (MATCHES, METHODS, SUBWORD_METHODS, WEIGHT_SCHEMES, Vocabulary, byte_match, prefix_match,
                         text_of)
from .tokenizer import VOCABULARY_TENSORS, copy_tokenizer, has_tokenizer, load_tokenizer

SHARED_K = ("omp", "common_interpolation", "stb", "mp_rope")  # the methods that take k of the shared tokens
RANDOM = ("randn", "john_hewitt", "landmark_pca")  # (landmark_pca: torch.pca_lowrank's random projections)
# the methods that run on the CPU whatever --device says: landmark_pca's pca_lowrank would draw from a GPU's own
# generator; zero and randn compute nothing
ON_CPU = ("landmark_pca", "zero", "randn")
#: Token-indexed tensors that are output heads (the rest of `VOCABULARY_TENSORS` with two axes are
#: input embeddings, with one a head's bias).
HEADS = frozenset({"lm_head.weight", "output.weight", "embed_out.weight", "transformer.output_layer.weight",
                   "cls.predictions.decoder.weight", "vocab_projector.weight", "lm_head.decoder.weight",
                   "lm_head.linear.weight", "language_model.lm_head.weight", "proj_out.weight"})
#: config.json keys taken from the donor (null where the donor has none: the model's ids name old tokens).
TOKEN_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id", "padding_side")


@dataclass(frozen=True)
class SurgeryOptions:
    """mergekit-tokensurgeon's options (its defaults); `prefix_match` and `byte_match` say which matrices
    allow those matches (`MATCHES`)."""

    method: str = "omp"
    k: int = 64
    cosine: bool = False
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    batch_size: int | None = 512
    prefix_match: str = "no"
    byte_match: str = "no"
    magikarp: bool = False
    new_vocab_noise: float | None = None
    new_vocab_scale: float | None = None

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("weight_scheme", WEIGHT_SCHEMES), ("prefix_match", MATCHES),
                              ("subword_method", SUBWORD_METHODS), ("byte_match", MATCHES)):
            if getattr(self, name) not in allowed:
                raise AdaptkitError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}; one of: "
                                    f"{', '.join(allowed)}")
        if self.k < 1:
            raise AdaptkitError(f"-k must be at least 1, got {self.k}")

    def allows(self, match: str, lm_head: bool) -> bool:
        """Whether `match` (prefix_match or byte_match) is on for the LM head or the input embedding: `embed`
        means the embedding and `lm_head` the head. (mergekit 0.1.5 has them the other way round: its
        `embed` turns the match on for the head only, and its `lm_head` for the embedding only.)"""
        return getattr(self, match) in ("yes", "lm_head" if lm_head else "embed")


def roles(source: ModelSource, what: str) -> tuple[str | None, str | None, list[str]]:
    """A model's input embedding, LM head (None when tied and not stored) and token-indexed biases."""
    names = [n for n in source.keys() if n in VOCABULARY_TENSORS]
    ones = [n for n in names if len(source.info(n).shape) == 1]
    heads = [n for n in names if n in HEADS and n not in ones]
    embeds = [n for n in names if n not in HEADS and n not in ones]
    for kind, found in (("input embeddings", embeds), ("LM heads", heads)):
        if len(found) > 1:
            raise AdaptkitError(f"{what} {source.ref} has {len(found)} {kind} ({', '.join(found)}): tokensurgeon "
                                "handles models with one")
    if not embeds:
        raise AdaptkitError(f"{what} {source.ref} has no input embedding adaptkit knows (one of the token-indexed "
                            "tensors of mergekit's architectures)")
    return embeds[0], heads[0] if heads else None, ones


@dataclass
class Counts:
    exact: int = 0
    byte: int = 0
    prefix: int = 0
    approximated: int = 0
    zeroed: int = 0


def match_rows(mine: Vocabulary, donor_vocab: Vocabulary, donor_rows: int, junk: set[int], options: SurgeryOptions,
               lm_head: bool, counts: Counts) -> tuple[list[tuple[int, int]], list[tuple[int, Any]]]:
    """The donor ids that take a row of the model's (`mine`: its tokens within its matrix) as (id, row),
    and those to approximate as (id, key); each counted by how it matched, or as zeroed (past the donor's
    rows, or `junk`)."""
    kept, new = [], []
    for i, key in sorted(donor_vocab.keys.items()):
        if i >= donor_rows or i in junk:
            counts.zeroed += 1
            continue
        for kind, match in (("exact", lambda k, ids: ids.get(k)), ("byte", byte_match), ("prefix", prefix_match)):
            if kind != "exact" and not options.allows(f"{kind}_match", lm_head):
                continue
            if (found := match(key, mine.ids)) is not None:
                kept.append((i, found))
                setattr(counts, kind, getattr(counts, kind) + 1)
                break
        else:
            new.append((i, key))
    counts.approximated += len(new)
    return kept, new


def build_matrix(orig, donor, model_vocab: Vocabulary, donor_vocab: Vocabulary, junk: set[int], rows: int,
                 options: SurgeryOptions, lm_head: bool, split: Callable[[str], list[int]], generator,
                 counts: Counts, rope: tuple | None = None, progress: str | None = None, device=None):
    """The new matrix (`rows` × the model's width, its dtype) for one of embedding / LM head; `progress`: a
    progress bar's title, for the approximations, which run on `device` but for ON_CPU's (the matrices moved
    there, each batch's rows back; random draws made on the CPU, where the generator is)."""
    import torch

    device = None if options.method in ON_CPU else device
    rows_of = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)  # noqa: E731  (indices into them)

    mine = model_vocab.where(lambda _, i: i < orig.shape[0])
    theirs = donor_vocab.where(lambda _, i: i < donor.shape[0])
    out = torch.zeros(rows, orig.shape[1], dtype=orig.dtype)
    kept, new = match_rows(mine, donor_vocab, donor.shape[0], junk, options, lm_head, counts)
    if kept:
        out[torch.tensor([i for i, _ in kept])] = orig[torch.tensor([j for _, j in kept])]
    shared = sorted(set(mine.ids) & set(theirs.ids), key=lambda k: theirs.ids[k])
    orig, donor = orig.to(device), donor.to(device)
    context = {"orig": orig, "donor": donor, "lm_head": lm_head, "split": split, "generator": generator, "rope": rope,
               "orig_shared": orig[rows_of([mine.ids[k] for k in shared])],
               "donor_shared": donor[rows_of([theirs.ids[k] for k in shared])]}
    if options.method == "stb" and new:  # its basis from the shared tokens less the donor's junk (mergekit's)
        trained = [k for k in shared if theirs.ids[k] not in junk]
        context["basis"] = ta.token_basis(orig[rows_of([mine.ids[k] for k in trained])],
                                          donor[rows_of([theirs.ids[k] for k in trained])], options.k)
    if new and options.method in SHARED_K:  # (before the progress bar starts)
        ta.check_k(options.k, len(shared))
        if options.method == "omp":
            ta.check_width(options.k, donor.shape[1])
    size = options.batch_size if options.batch_size and options.batch_size > 0 else max(len(new), 1)
    with tqdm(total=len(new), unit="token", desc=progress, disable=progress is None, leave=False) as bar:
        for start in range(0, len(new), size):
            batch = new[start:start + size]
            rows_new = approximate(options, [i for i, _ in batch], [text_of(k) for _, k in batch], context).cpu()
            if options.new_vocab_noise:
                noise = torch.randn(rows_new.shape, dtype=rows_new.dtype, generator=generator)
                rows_new = rows_new + noise * options.new_vocab_noise
            if options.new_vocab_scale is not None:  # (0 too: mergekit skips a scale of 0 as if none were given)
                rows_new = rows_new * options.new_vocab_scale
            out[torch.tensor([i for i, _ in batch], dtype=torch.long)] = rows_new
            bar.update(len(batch))
    return out


def approximate(options: SurgeryOptions, ids: list[int], texts: list[str], c: dict):
    """Rows for the donor tokens `ids` (their texts for subword), by `options.method`."""
    import torch

    orig, method, count = c["orig"], options.method, len(ids)
    if method == "mean":
        return orig.mean(dim=0).unsqueeze(0).expand(count, -1).clone()
    if method == "zero":
        return torch.zeros(count, orig.shape[1], dtype=orig.dtype)
    if method == "randn":
        return torch.randn(count, orig.shape[1], dtype=orig.dtype, generator=c["generator"])
    if method == "john_hewitt":
        return ta.john_hewitt(orig, count, c["generator"])
    if method == "subword":
        return ta.subword(orig, texts, c["split"], options.subword_method, c["lm_head"])
    targets = c["donor"][torch.tensor(ids, dtype=torch.long, device=c["donor"].device)]
    if method == "stb":
        return ta.sparse_token_basis(targets, c["orig_shared"], c["donor_shared"], c["basis"])
    if method == "landmark_pca":  # (on the CPU: ON_CPU)
        with torch.random.fork_rng(devices=[]):  # pca_lowrank's projections from the run's generator
            torch.set_rng_state(c["generator"].get_state())
            rows = ta.landmark_pca(targets, c["donor_shared"], c["orig_shared"])
            c["generator"].set_state(torch.get_rng_state())
        return rows
    if method == "mp_rope":
        return ta.mp_rope(targets, c["donor_shared"], c["orig_shared"], options.k, *c["rope"])
    if method == "omp":
        indices, coefficients = ta.omp(targets, c["donor_shared"], options.k)
    else:
        work = ta.working(targets)
        indices, coefficients = ta.common_interpolation(work, c["donor_shared"].to(work.dtype), options.k,
                                                        cosine=options.cosine, scheme=options.weight_scheme)
    return ta.combine(coefficients, indices, c["orig_shared"])


def surgery(model: str, donor: str, out: str | Path, options: SurgeryOptions = SurgeryOptions(), *,
            force: bool = False, seed: int | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
            allow_pickle: bool = False, progress: bool = False, card: bool = True,
            dry_run: bool = False, device: str | None = None) -> dict[str, Any]:
    """Write `model` with `donor`'s tokenizer into the folder `out` (whole or not at all); returns a
    report (the CLI's --json). `seed` drives randn, john_hewitt, landmark_pca and --new-vocab-noise
    (mergekit's --random-seed gives the same draws). `dry_run`: the report of how the rows would be made
    (kept, approximated, zeroed), nothing approximated or written. The approximations run on `device`
    (`adaptkit.devices`: cpu, cuda, cuda:N, auto)."""
    import torch

    where = compute_device(device)
    start = time.perf_counter()
    refs = (Ref.parse(model, "model"), Ref.parse(donor, "donor"))
    if not dry_run:
        check_output(out, force=force, inputs=[r.model for r in refs] + [a for r in refs for a in r.adapters])
    source, giver = (open_input(r, allow_pickle=allow_pickle) for r in refs)
    tokenizers = [_load_tokenizer(s, what) for s, what in ((source, "model"), (giver, "donor"))]
    vocabs = [Vocabulary.of(t) for t in tokenizers]
    (embed, head, biases), (donor_embed, donor_head, _) = roles(source, "model"), roles(giver, "donor")
    # (tensors as stored; a MODEL+ADAPTER's ΔW added in float32 and rounded once to that dtype: `ModelSource.get`)
    matrices = {embed: (source.get(embed, float32=False), giver.get(donor_embed, float32=False))}
    if head is not None:
        donor_head = donor_head or giver.stored("lm_head.weight") or donor_embed  # a tied donor's head is its embedding
        matrices[head] = (source.get(head, float32=False), giver.get(donor_head, float32=False))
    rope = _rope(source.config, giver.config, refs) if options.method == "mp_rope" else None
    generator = torch.Generator()
    seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
    model_vocab, donor_vocab, junk = _magikarp(vocabs, matrices, embed, head) if options.magikarp \
        else (*vocabs, set())
    rows = max(vocabs[1].keys) + 1
    split = _splitter(tokenizers[0])
    counts = {name: Counts() for name in matrices}
    report = {"model": str(refs[0]), "donor": str(refs[1]), "output": str(out), "method": options.method,
              "options": {k: v for k, v in vars(options).items() if k != "method"}, "vocab_size": rows,
              "model_vocab_size": max(vocabs[0].keys) + 1,
              "seed": seed if options.method in RANDOM or options.new_vocab_noise else None, "device": str(where)}
    if dry_run:
        for name, (mine, theirs) in matrices.items():
            match_rows(model_vocab.where(lambda _, i, m=mine: i < m.shape[0]), donor_vocab, theirs.shape[0], junk,
                       options, name == head, counts[name])
        return {**report, "tensors": {n: vars(c) for n, c in counts.items()}, "dry_run": True}
    built = {name: build_matrix(mine, theirs, model_vocab, donor_vocab, junk, rows, options, name == head, split,
                                generator, counts[name], rope, f"{options.method} ({name})" if progress else None, where)
             for name, (mine, theirs) in matrices.items()}
    report["tensors"] = {n: vars(c) for n, c in counts.items()}
    layout = [(n, torch_to_code(built[n].dtype) if n in built else source.info(n).dtype,
               (rows, *source.info(n).shape[1:]) if n in built or n in biases else source.info(n).shape)
              for n in source.keys()]
    with atomic_output(out, force=force, inputs=[r.model for r in refs]) as tmp:
        (tmp / "config.json").write_text(readers.dump_json(_config(source.config, giver.config), tmp / "config.json"))
        set_vocab_size(tmp, rows)
        copy_tokenizer(giver.root, tmp)
        writer = ShardedWriter(tmp, layout, shard_size=shard_size, metadata={"format": "pt"})
        try:
            for name, _, _ in tqdm(layout, unit="tensor", desc="tokensurgeon", disable=not progress, leave=False):
                tensor = built.get(name)
                if tensor is None:
                    tensor = source.get(name, float32=False)
                    if name in biases:
                        tensor = _remapped(tensor, model_vocab, donor_vocab, rows)
                writer.write(name, tensor)
        except BaseException:
            writer.abort()
            raise
        files = writer.close()
        report["files"] = [f.name for f in files]
        if card:
            from .card import CARD, surgery_card

            (tmp / CARD).write_text(surgery_card(report), encoding="utf-8")
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _load_tokenizer(source: ModelSource, what: str):
    if not has_tokenizer(source.root):
        raise AdaptkitError(f"{what} {source.ref} has no tokenizer files: tokensurgeon matches tokens by their text")
    return load_tokenizer(source.root)


def _rope(model: dict | None, donor: dict | None, refs: tuple[Ref, Ref]) -> tuple[tuple[int, int], tuple[float, float]]:
    """mp_rope's (donor's, model's) attention heads and RoPE bases, from config.json (`rope_theta`, or
    transformers 5's `rope_parameters.rope_theta`; a multimodal model's `text_config`)."""
    heads, bases = [], []
    for config, ref in ((donor, refs[1]), (model, refs[0])):
        config = config or {}
        config = config.get("text_config", config) if "num_attention_heads" not in config else config
        base = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
        count, width = config.get("num_attention_heads"), config.get("hidden_size")
        if not isinstance(base, (int, float)) or not isinstance(count, int) or not isinstance(width, int) \
                or count < 1 or width % (2 * count):
            raise AdaptkitError(f"mp_rope needs a RoPE model: {ref}'s config.json has no rope_theta, or no "
                                "num_attention_heads dividing hidden_size into even heads")
        heads.append(count)
        bases.append(float(base))
    return (heads[0], heads[1]), (bases[0], bases[1])


def _splitter(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _magikarp(vocabs: list[Vocabulary], matrices: dict, embed: str, head: str | None):
    """--magikarp: the model's vocabulary less the tokens not well trained in both models; the donor ids
    trained in neither (zeroed)."""
    trained = []
    for side, vocab in enumerate(vocabs):
        head_rows = matrices[head][side] if head is not None else None
        trained.append(ta.well_trained(vocab.ids, {k: text_of(k) for k in vocab.ids}, matrices[embed][side], head_rows))
    junk = {i for i, key in vocabs[1].keys.items() if key not in trained[0] and key not in trained[1]}
    both = trained[0] & trained[1]
    return vocabs[0].where(lambda key, _: key in both), vocabs[1], junk


def _config(model: dict | None, donor: dict | None) -> dict:
    """The model's config.json with the donor's special token ids (vocab_size is set after)."""
    config, donor = dict(model or {}), donor or {}
    for key in TOKEN_KEYS:  # the donor's; a token id only the model's config has names an old token: null
        if key in donor or (key in config and key != "padding_side"):
            config[key] = donor.get(key)
    return config


def _remapped(tensor, model_vocab: Vocabulary, donor_vocab: Vocabulary, rows: int):
    """A token-indexed bias in the donor's order: the model's value for a token it has, else 0."""
    import torch

    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    pairs = [(i, model_vocab.ids[k]) for i, k in donor_vocab.keys.items()
             if model_vocab.ids.get(k, tensor.shape[0]) < tensor.shape[0]]
    if pairs:
        out[torch.tensor([i for i, _ in pairs])] = tensor[torch.tensor([j for _, j in pairs])]
    return out
