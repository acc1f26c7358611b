"""Tokenizers: train a byte-level BPE on the training split, or load an existing one (file, dir, or HF name).

Every tokenizer is stored as `tokenizer.json` (HF `tokenizers` format) in the dataset directory, so training and
generation never need the network. Documents are separated by the end-of-text token.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 300")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer.json path, a directory holding one, or a Hugging Face hub name (network needed)."""
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if p.is_file():
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:
            raise ValueError(f"{p} is not a valid tokenizer.json ({e})") from None
    if Path(spec).is_dir():
        raise ValueError(f"tokenizer directory {spec!r} holds no tokenizer.json")
    # a hub name is "name" or "org/name"; a value that can only be a local path fails here, not after the hub's retries
    if spec.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ValueError(f"tokenizer {spec!r}: no such file or directory (a tokenizer.json, a directory holding one, "
                         f"or a Hugging Face hub name)")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {spec!r}: not a tokenizer.json file or directory, and the hub "
                         f"lookup failed ({type(e).__name__}); use --tokenizer bpe to train one") from None


def eot_id(tok: Tokenizer) -> int:
    """The document separator: our EOT, else the tokenizer's </s> or <eos>; appended after every document."""
    for t in (EOT, "</s>", "<eos>", "<|endoftext|>"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    raise ValueError("tokenizer has no end-of-text token (<|endoftext|>, </s> or <eos>)")
