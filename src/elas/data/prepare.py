"""`elas data prepare`: text source -> tokenizer -> packed token files.

A dataset directory holds:
    train.bin, val.bin   token ids, uint16 (vocab <= 65536) or uint32, documents joined by the EOT token
    tokenizer.json       the tokenizer (HF `tokenizers` format)
    meta.json            source, counts, dtype, vocab size, EOT id, the unigram baseline perplexity of val, and the
                         SHA-1 of train.bin and val.bin (the same data on another machine has the same ones)
The directory is built under a temporary name, its files fsynced, and renamed when complete, so a crash (a kill,
a full disk, the machine going down) never leaves half a dataset.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from .sources import BUILTIN_PARTS, SourceError, builtin_docs, file_docs, hf_docs
from .tokenizer import eot_id, load_tokenizer, train_bpe


class DataError(Exception):
    pass


def is_val(doc_id: str, val_frac: float) -> bool:
    """Stable split: a document is in validation iff the CRC32 of its id falls in the first val_frac of 2^32."""
    return zlib.crc32(doc_id.encode("utf-8")) < val_frac * 2**32


class _Reader:
    """The source's documents, read once in order and split by `is_val`; `read` counts their UTF-8 bytes (the
    --max-mb cap) and `ended` says whether the source ran out."""

    def __init__(self, docs, max_bytes: int | None, val_frac: float):
        self.docs, self.max_bytes, self.val_frac = iter(docs), max_bytes, val_frac
        self.read, self.ended, self.capped = 0, False, False

    def __iter__(self):
        """(is_val, text) until the source ends or --max-mb is reached."""
        while not self.capped:
            try:
                doc_id, text = next(self.docs)
            except StopIteration:
                self.ended = True
                return
            try:
                self.read += len(text.encode("utf-8"))
            except UnicodeEncodeError as e:  # (a JSON "\ud83d" escape: json.loads accepts a lone surrogate)
                raise SourceError(f"{doc_id}: its text holds an unpaired surrogate ({text[e.start]!r} at character "
                                  f"{e.start}), which no UTF-8 text can: repair or drop that document") from None
            self.capped = bool(self.max_bytes) and self.read >= self.max_bytes
            yield is_val(doc_id, self.val_frac), text

    def collect(self, soft_bytes: int | None = None):
        """Read until the source ends, --max-mb is reached, or (soft_bytes) that many bytes were read and both
        splits hold a document: the text held in memory (the tokenizer's training text)."""
        train, val = [], []
        for v, text in self:
            (val if v else train).append(text)
            if soft_bytes and self.read >= soft_bytes and train and val:
                break
        return train, val

    def more_train(self, val: list):
        """The rest of the source's training texts, streamed; its validation texts appended to `val`."""
        for v, text in self:
            if v:
                val.append(text)
            else:
                yield text


# the text read without --max-tokens where --max-mb is not given (DEFAULT_MB). With --max-tokens, the text first read
# (held in memory, the BPE's training text) is this many bytes a token, at least DEFAULT_MB (a source under it comes
# out as without the cap) and at most MAX_HELD_BYTES; the rest of the source streams through the tokenizer until
# --max-tokens are written (a
# byte-level BPE token is ~3-5 bytes of English or code)
DEFAULT_MB = 200.0
BYTES_PER_TOKEN_GUESS = 8
MAX_HELD_BYTES = 1_000_000_000


def fsync_dir(path: Path) -> None:
    """A new file's name (or a rename) is durable only once the directory holding it is fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # (a platform that cannot open a directory)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _batches(texts, n: int = 256):
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_tokens(path: Path, texts, tok, eot: int, dtype, max_tokens: int | None) -> tuple[int, int]:
    """Each text's ids then one EOT, until max_tokens: (tokens, documents) written (a document cut short counts)."""
    n = docs = 0
    encoded = (enc for b in _batches(texts) for enc in tok.encode_batch(b))
    with open(path, "wb") as fh:
        for enc in encoded:
            # one EOT a document: a tokenizer whose post-processor appends it itself (T5's "$A </s>") is not given a
            # second; one that prepends a BOS (Llama's "<s> $A") keeps it, as `elas generate` encodes prompts
            ids = np.asarray(enc.ids if enc.ids[-1:] == [eot] else enc.ids + [eot], dtype=dtype)
            if max_tokens is not None and n + len(ids) > max_tokens:
                ids = ids[: max_tokens - n]
            fh.write(ids.tobytes())
            n += len(ids)
            docs += 1
            if max_tokens is not None and n >= max_tokens:
                break
        # on disk before meta.json names the dataset complete: unsynced, a machine crash after the rename could
        # leave the files empty or zero-filled under a meta.json that vouches for them
        fh.flush()
        os.fsync(fh.fileno())
    return n, docs


def file_sha1(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-1 of a file's bytes (the dataset's fingerprint in meta.json: runs on other machines, or prepared again
    there, can show they trained on the same tokens)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# what a dataset directory holds: --force replaces these and refuses to touch a directory holding anything else
DATASET_FILES = frozenset({"meta.json", "tokenizer.json", "train.bin", "val.bin"})


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that would lose something: a file; a dataset without --force; a directory holding files
    that are not a dataset's (a user's texts, say), with or without --force."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory: choose a new or empty directory")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    other = sorted(names - DATASET_FILES)
    if other:
        shown = ", ".join(other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4 else "")
        raise DataError(f"--out {out} holds files that are not an elas dataset's ({shown}); choose a new or empty "
                        f"directory (nothing was removed)")
    if "meta.json" in names and not force:
        raise DataError(f"{out} already holds a dataset; pass --force to rebuild it or choose another --out")


def _gone(pid: str) -> bool:
    """Whether the process of a temporary directory's name has ended (not a number, or alive: False)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def _remove_stale_tmp(out: Path) -> None:
    """Remove the temporary directories (<out>.tmp-<pid>) that a killed prepare of the same --out left behind, where
    that process is gone."""
    for tmp in out.parent.glob(out.name + ".tmp-*"):
        if _gone(tmp.name.rsplit("-", 1)[-1]):
            shutil.rmtree(tmp, ignore_errors=True)


REPLACED = ".elas-replaced-"  # <out><REPLACED><pid>: the earlier dataset, moved aside by a --force rebuild


def _recover_replaced(out: Path) -> None:
    """A --force rebuild moves the earlier dataset aside (<out><REPLACED><pid>), renames the new one in, then
    removes the earlier one. Killed between the two renames, it left no --out: the earlier dataset is put back.
    Killed after them, the earlier one is removed. (A name of elas's own: a user's <out>.old-2024 is never
    touched.)"""
    for old in sorted(out.parent.glob(out.name + REPLACED + "*")):
        if not _gone(old.name.rsplit("-", 1)[-1]):
            continue
        if not out.exists() and (old / "meta.json").is_file():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _say(msg: str) -> None:
    """The default log, flushed: in a log file or a pipe each stage shows as it starts, not all at the end."""
    print(msg, flush=True)


def unigram_ppl(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Perplexity on val of the add-one-smoothed unigram distribution of train: the bar a model must clear."""
    counts = np.ones(vocab, dtype=np.float64)
    chunk = 1 << 20  # (np.bincount of a whole token file would copy it as int64: 4x a uint16 file)
    for i in range(0, len(train), chunk):
        counts += np.bincount(train[i:i + chunk], minlength=vocab)
    logp = np.log(counts / counts.sum())
    nll = sum(float(logp[val[i:i + chunk]].sum()) for i in range(0, len(val), chunk))
    return float(math.exp(-nll / len(val)))


def prepare(out: str | Path, source: str = "builtin", files: list[str] | None = None, hf: str | None = None,
            hf_config: str | None = None, hf_split: str = "train", text_field: str = "text", tokenizer: str = "bpe",
            vocab_size: int | None = None, max_mb: float | None = None, max_tokens: int | None = None,
            val_frac: float = 0.01, force: bool = False, log=_say) -> dict:
    out = Path(out).absolute()  # ("." has no name to put a temporary directory beside)
    if out.is_symlink():  # (the link's target is replaced, not the link: the temporary directory goes beside it)
        out = out.resolve()
    _recover_replaced(out)
    _check_out(out, force)
    if not 0.0 < val_frac < 0.5:
        raise DataError(f"val_frac={val_frac} must be in (0, 0.5)")
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"max_tokens={max_tokens} must be a positive number of training tokens (or no cap)")
    if max_mb is not None and not 0 <= max_mb < math.inf:
        raise DataError(f"max_mb={max_mb} must be a finite number >= 0 (0: no cap)")
    if max_mb is None:  # (the text read: DEFAULT_MB, or, with max_tokens, until they are written)
        max_mb = 0.0 if max_tokens else DEFAULT_MB
    # an option of another source would be ignored, and the wrong text tokenized (minutes of work)
    if files and source != "files":
        raise DataError(f"--files is for --source files, not --source {source}: add --source files")
    if (hf or hf_config) and source != "hf":
        raise DataError(f"--hf/--hf-config are for --source hf, not --source {source}: add --source hf")
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = 32000
    if tokenizer == "bpe" and vocab_size < 300:  # before the text is read
        raise DataError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 300")
    if source == "builtin":
        docs, desc = builtin_docs(), "builtin: Python standard library + site-packages text"
    elif source in BUILTIN_PARTS:  # one half of builtin (train on one, measure transfer on the other)
        docs, desc = builtin_docs((source,)), f"builtin: {source} text only"
    elif source == "files":
        if not files:
            raise DataError("source 'files' needs --files PATH [PATH ...]")
        docs, desc = file_docs(files, text_field, log), f"files: {files}"
    elif source == "hf":
        if not hf:
            raise DataError("source 'hf' needs --hf NAME (e.g. allenai/c4 --hf-config en)")
        docs, desc = hf_docs(hf, hf_config, hf_split, text_field), f"hf: {hf} {hf_config or ''} {hf_split}".strip()
    else:
        raise DataError(f"unknown source {source!r}: expected builtin, {', '.join(BUILTIN_PARTS)}, files or hf")

    t0 = time.time()
    tok = None if tokenizer == "bpe" else load_tokenizer(tokenizer)  # a bad one before the text is read
    if tok is not None:
        eot_id(tok)  # (one without an end-of-text token, too)
        if vocab_size is not None and vocab_size != tok.get_vocab_size():  # (it would be ignored)
            raise DataError(f"vocab_size={vocab_size} differs from the vocabulary of tokenizer {tokenizer} "
                            f"({tok.get_vocab_size()} tokens): a given tokenizer keeps its own; leave the size out")
        # a tokenizer.json may configure truncation or padding (some hub tokenizers cut at 512 tokens): documents
        # would be cut short or padded, silently; a dataset tokenizes every document whole
        tok.no_truncation()
        tok.no_padding()
    # the output's directory is made before the text is read: an unwritable --out fails in a second, not after BPE
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    _remove_stale_tmp(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot create dataset directory {out}: {e.strerror}") from None
    try:
        return _prepare_into(tmp, out, docs, desc, tok, tokenizer, vocab_size, max_bytes=int(max_mb * 1e6) if max_mb
                             else None, max_tokens=max_tokens, val_frac=val_frac, t0=t0, log=log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_into(tmp: Path, out: Path, docs, desc: str, tok, tokenizer: str, vocab_size: int, max_bytes, max_tokens,
                  val_frac: float, t0: float, log) -> dict:
    log(f"reading {desc}" + (f", up to {max_bytes / 1e6:g} MB" if max_bytes else "")
        + (f", until {max_tokens:,} training tokens" if max_tokens else "") + " ...")
    reader = _Reader(docs, max_bytes, val_frac)
    held = min(max(max_tokens * BYTES_PER_TOKEN_GUESS, int(DEFAULT_MB * 1e6)), MAX_HELD_BYTES) if max_tokens else None
    try:
        train_txt, val_txt = reader.collect(held)
    except SourceError as e:
        raise DataError(str(e)) from None
    n_bytes = reader.read
    if len(train_txt) + len(val_txt) == 1:  # (a single book: no --val-frac can split it, nor more of its text)
        raise DataError(f"source {desc!r} gave 1 document, but training and validation need one each (one document "
                        f"per file; in a .jsonl, per line): split it into several files, or into a .jsonl with one "
                        f"document per line")
    if not train_txt or not val_txt:
        raise DataError(f"source {desc!r} gave {len(train_txt)} training and {len(val_txt)} validation documents; "
                        f"both must be non-empty (add text, or raise --val-frac)")
    log(f"collected {len(train_txt)} train / {len(val_txt)} val documents, {n_bytes / 1e6:.1f} MB ({desc})")
    if tok is None:
        log(f"training byte-level BPE, vocab {vocab_size} ...")
        tok = train_bpe(train_txt, vocab_size)
    vocab = tok.get_vocab_size()
    eot = eot_id(tok)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    log(f"tokenizing {len(train_txt):,} train / {len(val_txt):,} val documents ...")  # (minutes, for 200 MB)
    try:
        # with --max-tokens the source streams on past the text held, its validation documents kept for val.bin
        more = reader.more_train(val_txt) if max_tokens else ()
        n_train, train_docs = _write_tokens(tmp / "train.bin", itertools.chain(train_txt, more), tok, eot, dtype,
                                            max_tokens)
        n_val, val_docs = _write_tokens(tmp / "val.bin", val_txt, tok, eot, dtype, None)
        # (written here, not by tok.save: its failure, a full disk say, is a bare Exception, not an OSError)
        _write_synced(tmp / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
        tr = np.memmap(tmp / "train.bin", dtype=dtype, mode="r")
        va = np.memmap(tmp / "val.bin", dtype=dtype, mode="r")
        meta = {
            "source": desc, "tokenizer": tokenizer, "vocab_size": vocab, "eot_id": eot,
            "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
            "train_docs": train_docs, "val_docs": val_docs, "text_bytes": reader.read,
            "val_frac": val_frac, "unigram_val_ppl": unigram_ppl(np.asarray(tr), np.asarray(va), vocab),
            "max_token_id": int(max(tr.max(initial=0), va.max(initial=0))),  # checked against a model's vocab
            "train_sha1": file_sha1(tmp / "train.bin"), "val_sha1": file_sha1(tmp / "val.bin"),
            "seconds": round(time.time() - t0, 1),
        }
        del tr, va
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
        fsync_dir(tmp)
        # the earlier dataset (--force) is renamed aside, not removed, until the new one has its name: a kill or a
        # failure at any point leaves one whole dataset at --out (or, killed between the two renames, the earlier
        # one beside it, which the next prepare puts back: _recover_replaced)
        old = out.with_name(f"{out.name}{REPLACED}{os.getpid()}") if out.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.replace(old, out)
            raise
        fsync_dir(out.parent)  # (the renames themselves)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except SourceError as e:  # (a document read while streaming)
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"writing dataset {out} failed: {e.strerror or e}") from None
    if max_tokens and n_train < max_tokens:
        why = (f"--max-mb {max_bytes / 1e6:g} capped the text read (0: no cap)" if reader.capped
               else "the source ended")
        log(f"note: {n_train:,} training tokens written, fewer than --max-tokens {max_tokens:,}: {why}")
    log(f"wrote {out}: {n_train:,} train / {n_val:,} val tokens, vocab {vocab}, "
        f"unigram val perplexity {meta['unigram_val_ppl']:.1f}")
    return meta
