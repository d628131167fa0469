"""Tokens compared across tokenizers (`adaptkit tokensurgeon`): each token's normalized key, as
mergekit-tokensurgeon compares them.

A key is ("word_start", rest) for a token that starts with the tokenizer's word-start marker
(SentencePiece's `▁`, byte-level BPE's `Ġ`: both mean "starts a word"), ("special", role) for a BOS,
EOS, UNK, PAD, ... token (the donor's BOS matches the model's BOS whatever their texts), and the token
itself otherwise. A one-byte character and its `<0xNN>` byte token may stand for each other
(`byte_match`), and a token for its longest prefix (`prefix_match`). Also the values tokensurgeon's
options take, here where the command line reads them without importing torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: tokensurgeon's approximation methods, weight schemes (common_interpolation), subword methods, and the
#: matrices a byte or prefix match may apply to
METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn", "john_hewitt", "landmark_pca", "stb",
           "mp_rope")
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")
MATCHES = ("no", "embed", "lm_head", "yes")
GPT2_STYLE = {"GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast", "Qwen2Tokenizer",
              "Qwen2TokenizerFast"}
SP_STYLE = {"LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "GemmaTokenizer",
            "GemmaTokenizerFast"}


@dataclass
class Vocabulary:
    """A tokenizer's rows by normalized key (("word_start", rest) after the word-start marker, ("special",
    role) for a BOS, EOS, UNK, PAD, ... token, else the token; the lowest id where two tokens share a
    key) and every id's key."""

    ids: dict[Any, int] = field(default_factory=dict)
    keys: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer) -> Vocabulary:
        vocab = tokenizer.get_vocab()
        prefix = word_start(type(tokenizer).__name__, vocab)
        roles: dict[str, Any] = {}
        for role, value in tokenizer.special_tokens_map.items():
            if isinstance(value, str):  # (a list, transformers 4's additional_special_tokens: keyed by their text)
                roles.setdefault(value, ("special", role))
        out = cls()
        for token, i in sorted(vocab.items(), key=lambda item: item[1]):
            key = ("word_start", token[len(prefix):]) if token.startswith(prefix) else roles.get(token, token)
            out.keys[i] = key
            out.ids.setdefault(key, i)
        return out

    def where(self, keep: Callable[[Any, int], bool]) -> Vocabulary:
        """The tokens (key, id) that `keep` keeps."""
        return Vocabulary({k: i for k, i in self.ids.items() if keep(k, i)},
                          {i: k for i, k in self.keys.items() if keep(k, i)})


def word_start(name: str, vocab: dict[str, int]) -> str:
    """The marker a tokenizer puts before a word's first piece: by its class as mergekit decides
    (DeepSeek's Llama-class tokenizer with Ġ pieces included), else the marker most of its tokens start
    with (mergekit assumes Ġ)."""
    name = name.removesuffix("Fast")
    if name + "Fast" in GPT2_STYLE:
        return "Ġ"
    if name + "Fast" in SP_STYLE:
        return "Ġ" if "Ġhello" in vocab else "▁"
    starts = sum(t.startswith("▁") for t in vocab) - sum(t.startswith("Ġ") for t in vocab)
    return "▁" if starts > 0 else "Ġ"


def text_of(key: Any) -> str:
    """The text a key stands for: a space before a word start, a role's name (mergekit's), an
    additional special token's text."""
    if isinstance(key, tuple):
        return (" " if key[0] == "word_start" else "") + key[1]
    return key


def byte_match(key: Any, ids: dict[Any, int]) -> int | None:
    """The row of a one-byte character's <0xNN> token, or of a <0xNN> token's character."""
    if not isinstance(key, str):
        return None
    if len(key) == 1 and ord(key) < 256:
        return ids.get(f"<0x{ord(key):02X}>")
    if key.startswith("<0x") and key.endswith(">") and len(key) == 6:
        try:
            return ids.get(chr(int(key[3:-1], 16)))
        except ValueError:
            return None
    return None


def prefix_match(key: Any, ids: dict[Any, int]) -> int | None:
    """The row of the key's longest proper prefix the model has (not a special token's; not a prefix
    that is only whitespace)."""
    marker, text = key if isinstance(key, tuple) else (None, key)
    if marker == "special":
        return None
    for end in range(len(text) - 1, 0, -1):
        if not text[:end].strip():
            return None
        found = ids.get((marker, text[:end]) if marker else text[:end])
        if found is not None:
            return found
    return None
