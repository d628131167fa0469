"""Tiny text models for training tests: a word-level tokenizer, a tiny Llama and a tiny BERT (no
head) saved with it, and toy JSONL tasks a few optimizer steps can learn."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ("zero one two three four five six seven eight nine ten eleven red blue cat dog sat ran on the "
         "mat park good bad film").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (whitespace split, <s> prepended, </s> as EOS, <pad> as padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)


def vocab_size() -> int:
    return len(SPECIAL) + len(WORDS)


def llama_dir(folder: Path, seed: int = 0) -> Path:
    from builders import tiny_llama

    tiny_llama(seed, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def bert_dir(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT encoder without a classification head (dropout on, as in real BERTs)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def counting(n: int = 8, length: int = 6) -> list[dict]:
    """Causal LM: runs of consecutive number words, cyclic — the next word follows from the last."""
    numbers = WORDS[:12]
    return [{"text": " ".join(numbers[(i + k) % 12] for k in range(length))} for i in range(n)]


def sentiment(n: int = 8) -> list[dict]:
    """Classification by one word: 'good' -> pos, 'bad' -> neg (string labels, pos seen first)."""
    fillers = ["the film", "the cat sat on the mat", "a dog ran", "red blue film"]
    out = []
    for i in range(n):
        word, label = ("good", "pos") if i % 2 == 0 else ("bad", "neg")
        out.append({"text": f"{fillers[i % len(fillers)]} {word}", "label": label})
    return out
