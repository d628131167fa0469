"""Tokenizers in merge recipes: the output vocabulary, each input's token rows aligned to it, the chat template.

mergekit's keys and rules:
- `tokenizer_source: base | union | <model>` (the model may also be written `model:<path>`, or as a
  reference mapping: refs.py), or a `tokenizer:` block `{source, tokens, pad_to_multiple_of}` (source
  `union` unless given), not both.
  `base` is the base model's tokenizer (the first model's without a base) less any token whose id is
  at or past its config's vocab_size; `union` is that one plus every token another input uses (ids
  below its vocab_size); a model is that model's tokenizer as saved.
- `tokens: {<token>: {source, force}}` adds a token the vocabulary lacks. `source` is a model (its
  row of that token), `{kind: model_token, model, token | token_id}` (that model's row of another
  token) or `{kind: zero}`; `force: true` gives every input that row, even an input that has the token.
- Each input's token-indexed tensors (`VOCABULARY_TENSORS`: embeddings, LM heads) are re-indexed to
  the output vocabulary before the merge method sees them. A token an input lacks gets the row its
  `tokens:` entry names; else, when only one input has it, that input's row; when none has it, zeros;
  when the base has it, the base's row; else the mean of the rows of the inputs that have it.
  `pad_to_multiple_of` pads the rows to a multiple, each pad row the input's mean row
  (https://nlp.stanford.edu/~johnhew/vocab-expansion.html); config.json's vocab_size says the padded size.
- `chat_template`: a built-in name (`chat_templates.py`), `auto` (the template most inputs' tokenizers
  have) or a Jinja template, saved with the output's tokenizer.

Unlike mergekit, the ids `union` gives to new tokens do not depend on hash order: the base first,
then the other inputs in the recipe's order, each one's tokens in its own id order. And with `source:
base`, mergekit adds the `tokens:` to the base's own tokenizer object, so the base seems to have them
at ids past its vocabulary: it takes the base's padding rows there, or fails (KeyError) where the
base has none; adaptkit gives the base the row the entry names. Building tokenizers needs `transformers`
(an optional extra); recipes without these keys never import it.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import validate as v
from ..errors import AdaptkitError, closest, short
from ..io.paths import inside, regular_file
from .chat_templates import TEMPLATES
from .refs import Ref

if TYPE_CHECKING:
    from .embeddings import Truncation

#: Tensors whose rows (axis 0) are indexed by token id, by name, as mergekit's architecture
#: definitions list them (every one there has its vocabulary on axis 0).
VOCABULARY_TENSORS = frozenset({
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "model.language_model.embed_tokens.weight",
    "embed_tokens.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "shared.weight",
    "model.tok_embeddings.weight", "output.weight", "transformer.wte.weight", "transformer.embd.wte.weight",
    "transformer.word_embeddings.weight", "transformer.embedding.word_embeddings.weight",
    "transformer.output_layer.weight", "gpt_neox.embed_in.weight", "embed_out.weight", "backbone.embeddings.weight",
    "embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
    "cls.predictions.bias", "distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight",
    "vocab_projector.bias", "roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight",
    "lm_head.linear.weight", "lm_head.linear.bias", "layers.0.wte.weight",
    # multimodal models' text decoders (modules.py) and Whisper's decoder
    "language_model.model.embed_tokens.weight", "language_model.lm_head.weight", "model.decoder.embed_tokens.weight",
    "proj_out.weight"})
#: Files a saved tokenizer may consist of: a rebuilt tokenizer replaces all the donor's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
BLOCK_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
SOURCE_KEYS = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}


@dataclass(frozen=True)
class TokenSetting:
    """Where one token's row comes from: `kind` model (its row in `model`), model_token (`model`'s row
    of `token` or `token_id`), zero, or None (the default rules)."""

    kind: str | None = None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    source: str  # "base", "union" or a model reference
    tokens: dict[str, TokenSetting]
    pad_to_multiple_of: int | None = None


def _keys(where: str, given: dict, allowed: set[str]) -> None:
    for key in given:
        if key not in allowed:
            hint = closest(str(key), allowed)
            raise AdaptkitError(f"{where}: unknown key {short(key)}" + (f"; did you mean '{hint}'?" if hint else "")
                                + f" (valid: {', '.join(sorted(allowed))})")


def parse_settings(data: dict, src: str, refs: list[str]) -> tuple[TokenizerSettings | None, str | None]:
    """The recipe's tokenizer settings and chat template, checked; `refs` are its models' references."""
    given, block = data.get("tokenizer_source"), data.get("tokenizer")
    if given is not None and block is not None:
        raise AdaptkitError(f"{src}: give 'tokenizer_source' or a 'tokenizer' block, not both")
    settings = None
    if given is not None:
        settings = TokenizerSettings(_source(given, f"{src}: tokenizer_source"), {})
    elif block is not None:
        v.mapping(block, f"{src}: tokenizer")
        _keys(f"{src}: tokenizer", block, BLOCK_KEYS)
        source = _source(block.get("source", "union"), f"{src}: tokenizer.source")
        tokens = v.mapping(block.get("tokens") or {}, f"{src}: tokenizer.tokens")
        pad = block.get("pad_to_multiple_of")
        settings = TokenizerSettings(source, {str(t): _token(s, f"{src}: tokenizer.tokens.{t}", refs)
                                              for t, s in tokens.items()},
                                     None if pad is None else v.positive_int(pad, f"{src}: tokenizer.pad_to_multiple_of"))
    return settings, chat_template(data.get("chat_template"), f"{src}: chat_template")


def _source(given: Any, where: str) -> str:
    """`base`, `union`, or a model reference (a string, also written `model:<ref>`, or a mapping) as a string."""
    if isinstance(given, dict):
        return str(Ref.parse(given, where))
    text = v.text(given, where)
    return text if text in ("base", "union") else text.removeprefix("model:")


def _token(given: Any, where: str, refs: list[str]) -> TokenSetting:
    v.mapping(given if given is not None else {}, where)
    given = given or {}
    _keys(where, given, TOKEN_KEYS)
    force, source = v.flag(given.get("force", False), f"{where}.force"), given.get("source")
    if source is None:
        return TokenSetting(force=force)
    if isinstance(source, str) or (isinstance(source, dict) and "kind" not in source):  # (a model reference)
        return TokenSetting("model", _model(source, f"{where}.source", refs), force=force)
    kind = v.mapping(source, f"{where}.source").get("kind")
    if kind not in SOURCE_KEYS:
        raise AdaptkitError(f"{where}.source: a model, or a mapping with kind 'model_token' or 'zero', got {short(source)}")
    _keys(f"{where}.source", source, SOURCE_KEYS[kind])
    if kind == "zero":
        return TokenSetting("zero", force=force)
    if ("token" in source) == ("token_id" in source):
        raise AdaptkitError(f"{where}.source: give one of 'token' and 'token_id'")
    return TokenSetting("model_token", _model(source.get("model"), f"{where}.source.model", refs),
                        None if "token" not in source else v.text(source["token"], f"{where}.source.token"),
                        None if "token_id" not in source else v.count(source["token_id"], f"{where}.source.token_id"),
                        force)


def _model(ref: Any, where: str, refs: list[str]) -> str:
    if isinstance(ref, dict):
        ref = str(Ref.parse(ref, where))
    if not isinstance(ref, str) or ref not in refs:
        raise AdaptkitError(f"{where}: {short(ref)} is not one of the recipe's models ({', '.join(refs)})")
    return ref


def chat_template(given: Any, where: str) -> str | None:
    """A built-in template's text, `auto`, or a literal Jinja template (mergekit's rules tell them apart)."""
    if given is None:
        return None
    text = v.text(given, where)
    if text == "auto" or (len(text) < 256 and "\n" not in text and "{" not in text and text in TEMPLATES):
        return TEMPLATES.get(text, text)
    if len(text) < 20 or "{" not in text:
        raise AdaptkitError(f"{where}: {short(text)} is neither a built-in template ({', '.join(sorted(TEMPLATES))}, "
                            "auto) nor a Jinja template")
    return text


def vocab_size(config: dict | None) -> int | None:
    config = config or {}
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer (its vocabulary files, not only a chat template)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES[:7])


def copy_tokenizer(source: Path, dest: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> None:
    """The tokenizer files (`names`) of the folder `source` copied into `dest` as they are."""
    for name in names:
        path = source / name
        if path.exists():
            (dest / name).write_bytes(regular_file(inside(path, source), "tokenizer file").read_bytes())


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (transformers' fast tokenizer, never remote code), or one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as e:  # (any failure of transformers' or tokenizers' parsers on the files is the files')
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = text if isinstance(e, (OSError, ValueError, TypeError)) else f"{type(e).__name__}: {text}"
        raise AdaptkitError(f"{folder}: cannot load its tokenizer ({what})") from None


def _stripped(tokenizer, size: int | None, folder: Path):
    """The tokenizer less the tokens at or past `size` (BPE only, as in mergekit)."""
    from tokenizers import Tokenizer

    unused = {tok for tok, i in tokenizer.get_vocab().items() if size is not None and i >= size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise AdaptkitError(f"{folder}: the tokenizer has tokens past vocab_size {size}, and only a BPE one can "
                            f"be cut to it (this one is {data['model']['type']})")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not unused.intersection(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base, others: list[tuple[Any, int]]):
    """The base tokenizer (a copy) plus every other token the inputs use: plain ones, then added
    ones with their settings (the first input's where they differ)."""
    plain: list[str] = []
    added: dict[str, Any] = {}
    for tokenizer, size in others:
        for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if i < size:
                plain.append(tok)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base's own vocabulary stays as it was
        base.save_pretrained(tmp)
        out = load_tokenizer(Path(tmp))
    known = base.get_vocab()
    for tok in dict.fromkeys(plain):
        if tok not in added and tok not in known:
            out.add_tokens(tok)
    for info in added.values():
        out.add_tokens(info)
    return out


class Vocabulary:
    """The output tokenizer and, per input, the input's row of each output token (-1: it has none).

    `inputs` are (reference, folder, config) in mergekit's order (the models as listed, then the base)."""

    def __init__(self, settings: TokenizerSettings, template: str | None, inputs: list[tuple[str, Path, dict | None]],
                 base: str | None):
        import torch

        self.settings, self.template, self.base = settings, template, base
        self.tensors: frozenset[str] = frozenset()  # the token-indexed ones (see `build_vocabulary`)
        self.order = list(dict.fromkeys(ref for ref, _, _ in inputs))
        self.folders = folders = {ref: folder for ref, folder, _ in inputs}
        sizes = {ref: vocab_size(config) for ref, _, config in inputs}
        first = base or self.order[0]
        base_tok = _stripped(load_tokenizer(folders[first]), sizes[first], folders[first])
        tokenizers = {first: base_tok}
        for ref in self.order:
            if ref not in tokenizers:
                if has_tokenizer(folders[ref]):
                    tokenizers[ref] = load_tokenizer(folders[ref])
                else:
                    warnings.warn(f"{ref} has no tokenizer: taken to be the same as {first}'s")
        self.vocabs = {ref: tok.get_vocab() for ref, tok in tokenizers.items()}
        if settings.source == "base":
            out = base_tok
        elif settings.source == "union":
            ranked = [first] + [r for r in self.order if r != first and r in tokenizers]
            out = _union(base_tok, [(tokenizers[r], sizes[r] or len(tokenizers[r])) for r in ranked])
        else:
            from ..hub.repos import resolve_path

            out = load_tokenizer(resolve_path(settings.source))
        for tok in settings.tokens:
            if tok not in out.get_vocab():
                out.add_tokens(tok)
        self.tokenizer = out
        vocab = out.get_vocab()
        self.size = len(vocab)
        pad = settings.pad_to_multiple_of
        self.rows = -(-self.size // pad) * pad if pad else self.size
        self.ids = dict(vocab)
        self.tokens = {i: tok for tok, i in vocab.items()}
        self.rows_of: dict[str, torch.Tensor] = {}
        for ref in self.order:
            own = self.vocabs.get(ref, self.vocabs[first])
            limit = sizes[ref] or len(own)
            perm = torch.full((self.size,), -1, dtype=torch.long)
            for tok, i in vocab.items():
                if tok in own and own[tok] < limit:
                    perm[i] = own[tok]
            self.rows_of[ref] = perm
        self._check_tokens()

    def _check_tokens(self) -> None:
        """Each `tokens:` entry can give a row wherever one is needed (mergekit fails mid-merge)."""
        for tok, setting in self.settings.tokens.items():
            where, i = f"tokenizer.tokens.{tok}", self.ids[tok]
            lacking = [ref for ref in self.order if self.rows_of[ref][i] < 0]
            if setting.kind is None and setting.force:
                raise AdaptkitError(f"{where}: force needs a source for its row")
            if setting.kind is None and lacking:
                raise AdaptkitError(f"{where}: {lacking[0]} lacks it: give a source for its row")
            if setting.kind == "model" and self.rows_of[setting.model][i] < 0:
                raise AdaptkitError(f"{where}: {setting.model} has no token {short(tok)} to take its row from")
            if setting.kind == "model_token" and setting.token is not None \
                    and setting.token not in self.vocabs.get(setting.model, {}):
                raise AdaptkitError(f"{where}: {setting.model} has no token {short(setting.token)}")

    def align(self, name: str, refs: list[str], tensors: list, dtype) -> list:
        """Each input's tensor `name` with its rows (axis 0) re-indexed to the output vocabulary; `refs`
        name the inputs (one may appear twice). Tensors are replaced in the list one by one, so at most
        one more than the inputs' tensors is in memory."""
        from .embeddings import align_rows

        return align_rows(self, name, refs, tensors, dtype)

    def write(self, folder: Path) -> None:
        """The output tokenizer (and its chat template) into `folder`, replacing the donor's tokenizer
        files, and config.json's vocab_size set to the output's rows."""
        _set_template(self.tokenizer, self.template, self.folders)
        _save(self.tokenizer, folder)
        from .embeddings import set_vocab_size

        set_vocab_size(folder, self.rows)


def _set_template(tokenizer, template: str | None, folders: dict[str, Path]) -> None:
    if template == "auto":
        seen = []
        for folder in folders.values():
            found = load_tokenizer(folder).chat_template if has_tokenizer(folder) else None
            found = found.get("default") if isinstance(found, dict) else found
            if found:
                seen.append(found.strip())
        template = Counter(seen).most_common(1)[0][0] if seen else None
    if template:
        tokenizer.chat_template = template


def _save(tokenizer, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(folder))


def write_chat_template(template: str, donor: Path, folders: dict[str, Path], folder: Path) -> None:
    """No tokenizer settings but a chat template: the donor's tokenizer saved again with it."""
    tokenizer = load_tokenizer(donor)
    _set_template(tokenizer, template, folders)
    _save(tokenizer, folder)


def vocabulary_tensors(names: list[str]) -> list[str]:
    """The token-indexed tensors among `names` (by name: a shape can coincide, e.g. an MLP width
    equal to the vocabulary size); none of them known is an error, not a merge left unaligned."""
    listed = [n for n in names if n in VOCABULARY_TENSORS]
    if not listed:
        raise AdaptkitError("tokenizer settings: none of the tensors is one adaptkit knows to be indexed by token "
                            f"(e.g. {', '.join(sorted(VOCABULARY_TENSORS)[:3])}), so none can be aligned")
    return listed


def build_vocabulary(recipe, refs: list[str], sources: list, names: list[str]) -> Vocabulary | Truncation | None:
    """The recipe's output vocabulary over the plan's inputs (`refs` name `sources`, a `ModelSource`
    each) and its token-indexed tensors among `names`; without tokenizer settings, None, or with
    --unsafe-truncate-embeddings the common prefix of token rows that differ (`embeddings.Truncation`)."""
    if recipe.tokenizer_settings is None:
        from .embeddings import truncation

        return truncation(sources, [n for n in names if n in VOCABULARY_TENSORS]) if recipe.truncate_embeddings else None
    if recipe.truncate_embeddings:
        warnings.warn("--unsafe-truncate-embeddings: the recipe's tokenizer settings align the token rows instead")
    by_ref = dict(zip(refs, sources))
    order = [str(m) for m in recipe.models] + ([str(recipe.base)] if recipe.base else [])
    inputs = [(ref, by_ref[ref].root, by_ref[ref].config) for ref in dict.fromkeys(order) if ref in by_ref]
    vocabulary = Vocabulary(recipe.tokenizer_settings, recipe.template, inputs, str(recipe.base) if recipe.base else None)
    vocabulary.tensors = frozenset(vocabulary_tensors(names))
    return vocabulary


def write_tokenizer(vocabulary: Vocabulary | None, recipe, refs: list[str], sources: list, folder: Path) -> None:
    """The output's tokenizer files: the rebuilt tokenizer, or the donor's (the base, else the first
    model) saved again with the recipe's chat template; else the donor's files stay as copied."""
    if vocabulary is not None:
        vocabulary.write(folder)
    if recipe.template and not isinstance(vocabulary, Vocabulary):
        folders = {ref: source.root for ref, source in zip(refs, sources)}
        donor = folders[str(recipe.base)] if recipe.base and str(recipe.base) in folders else folders[str(recipe.models[0])]
        write_chat_template(recipe.template, donor, folders, folder)
