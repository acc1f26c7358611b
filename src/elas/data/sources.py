"""Text sources: each yields (doc_id, text) in a deterministic order.

- builtin: the Python sources and docs installed with the running interpreter (standard library, then
  site-packages; .py .md .rst .txt). It exists on every machine, so it is the offline default corpus.
- files: directories (recursive), globs and files of text; `.jsonl` files yield one document per line from a
  text field.
- hf: a Hugging Face dataset, streamed (needs `pip install datasets` and the network).
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_EXTS = (".py", ".md", ".rst", ".txt")
SKIP_DIRS = {"__pycache__", ".git", "node_modules"}
MAX_FILE_BYTES = 2_000_000  # generated blobs (vendored data tables) say little about language


class SourceError(Exception):
    pass


def _walk(root: Path, exclude: set[Path], any_case: bool = False) -> list[Path]:
    """The files under root with a text extension, sorted (any_case: `.TXT` too; a user's --files directory, not the
    built-in corpus, whose files and so its dataset stay as they were)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dp = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and dp / d not in exclude)
        out += [dp / f for f in sorted(filenames) if (f.lower() if any_case else f).endswith(TEXT_EXTS)]
    return out


def _skipped(root: Path) -> dict[str, int]:
    """Files under a --files directory that `_walk` leaves out (no text extension), counted by extension."""
    counts: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            if not f.lower().endswith(TEXT_EXTS + (".jsonl",)):
                ext = os.path.splitext(f)[1] or "(none)"
                counts[ext] = counts.get(ext, 0) + 1
    return counts


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_users_text(path: Path) -> str:
    """A file of --files (named, or in a directory named): read whole, whatever its size. The built-in corpus's
    skips (blobs over 2 MB, unreadable or non-UTF-8 files) would drop a user's own text silently: an error instead."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8, or leave it out of "
                          f"--files") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None


BUILTIN_PARTS = ("stdlib", "site-packages")


def builtin_docs(parts: tuple[str, ...] = BUILTIN_PARTS) -> Iterator[tuple[str, str]]:
    """(label/relative path, text), standard library first, then site-packages; sorted, machine-independent ids.
    parts: which of the two (disjoint: site-packages is excluded from the standard library's walk), e.g. one to
    train on and the other as a transfer set."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    site = sorted({Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()})
    roots = [("stdlib", stdlib, set(site))] + [("site-packages", s, set()) for s in site]
    roots = [r for r in roots if r[0] in parts]
    seen = set()
    for label, root, exclude in roots:
        if not root.is_dir():
            continue
        for f in _walk(root, exclude):
            if f in seen:
                continue
            seen.add(f)
            text = _read_text(f)
            if text:
                yield f"{label}/{f.relative_to(root).as_posix()}", text


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(index, line) of a JSONL file, streamed (it may be far larger than what --max-mb takes of it); bytes that are
    not UTF-8 are an error naming the file, not a bare codec message."""
    try:
        with open(path, encoding="utf-8") as fh:
            yield from enumerate(fh)
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not UTF-8 text: convert it to UTF-8, or leave it out of --files") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None


def _json_kind(v) -> str:
    return ("null" if v is None else "a boolean" if isinstance(v, bool) else "a number" if isinstance(v, (int, float))
            else "an array" if isinstance(v, list) else "an object" if isinstance(v, dict) else "a string")


def file_docs(specs: list[str], text_field: str = "text", log=None) -> Iterator[tuple[str, str]]:
    """Directories (recursive, text extensions in any case), globs, plain files, and .jsonl files (one doc per line).
    The files a directory holds under other extensions are left out, and `log` (if given) says how many of each.

    A document's id (which decides its train/val split) is its path below the spec's root: the directory given,
    a file's own directory, a glob's part before its first wildcard. The same files give the same dataset
    however their location is spelled (relative or absolute, from any working directory) or wherever they move."""
    files: list[tuple[Path, Path]] = []  # (file, the root its id is taken below)
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            jsonl = sorted(f for f in p.rglob("*") if f.name.lower().endswith(".jsonl") and f.is_file())
            files += [(f, p) for f in _walk(p, set(), any_case=True) + jsonl]
            skipped = _skipped(p) if log else {}
            if skipped:
                shown = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1])[:6])
                log(f"--files {spec}: left out {sum(skipped.values())} files without a text extension "
                    f"({', '.join(TEXT_EXTS)}, .jsonl): {shown}; name them, or a glob, to include them")
        elif p.is_file():
            files.append((p, p.parent))
        else:
            matched = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matched:
                raise SourceError(f"no files match {spec!r}: give a directory, a file, a glob or a .jsonl file")
            files += [(f, _glob_root(p)) for f in matched]
    if not files:
        raise SourceError(f"no text files (.py .md .rst .txt .jsonl) found in {specs}")
    seen = set()  # a file reached by two specs (a directory and a file in it) is one document, of one split
    for f, root in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        doc = f.relative_to(root).as_posix()
        if f.suffix.lower() == ".jsonl":
            for i, line in _jsonl_lines(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{f}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise SourceError(f"{f}:{i + 1}: {_json_kind(rec)}, not an object with a {text_field!r} "
                                      f"field")
                if text_field not in rec:
                    raise SourceError(f"{f}:{i + 1}: no field {text_field!r} (fields: {sorted(rec)}); "
                                      f"choose one with --text-field")
                if rec[text_field] is None:  # no text: skipped, as an empty file is (str() made it the text "None")
                    continue
                if not isinstance(rec[text_field], str):  # (nor is a number or a list made text)
                    raise SourceError(f"{f}:{i + 1}: field {text_field!r} is {_json_kind(rec[text_field])}, not a "
                                      f"string; choose another with --text-field")
                if "\\u" in line:  # (only a JSON escape gives a lone surrogate: json.loads accepts "\ud83d")
                    try:
                        rec[text_field].encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise SourceError(f"{f}:{i + 1}: field {text_field!r} holds an unpaired surrogate escape "
                                          f"({rec[text_field][e.start]!r}), which is not text: repair or drop that "
                                          f"line") from None
                yield f"{doc}:{i}", rec[text_field]
        else:
            text = _read_users_text(f)
            if text:
                yield doc, text


def _glob_root(spec: Path) -> Path:
    """A glob's path before its first part with a wildcard."""
    root = []
    for part in spec.parts:
        if glob.has_magic(part):
            break
        root.append(part)
    return Path(*root)


def hf_docs(name: str, config: str | None, split: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise SourceError("Hugging Face datasets need `pip install datasets` (or `pip install elas[hf]`); "
                          "offline, point --files at local text or JSONL instead") from None
    records = _hf_records(datasets, name, config, split)
    for i, rec in records:
        if text_field not in rec:  # (before: "could not stream" a dataset that streamed fine)
            raise SourceError(f"{name} record {i}: no field {text_field!r} (fields: {sorted(rec)}); choose one with "
                              f"--text-field")
        text = rec[text_field]
        if text is None:  # no text: skipped, as in a JSONL file
            continue
        if not isinstance(text, str):
            raise SourceError(f"{name} record {i}: field {text_field!r} is {_json_kind(text)}, not a string; choose "
                              f"another with --text-field")
        yield f"{name}:{split}:{i}", text


def _hf_records(datasets, name: str, config: str | None, split: str) -> Iterator[tuple[int, dict]]:
    """(index, record) of a streamed Hugging Face split; a failure to reach or read it (network, auth, a missing
    dataset or config) is one line."""
    try:
        for i, rec in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
            yield i, rec
    except Exception as e:  # network, auth, missing dataset: all user-facing
        raise SourceError(f"could not stream {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"without network, use --files with local text or JSONL") from None
