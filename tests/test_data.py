"""Dataset preparation, the stable split, the stateless batch order."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from elas.cli import main
from elas.data import Batches, DataError, TokenWindows, load_meta, prepare
from elas.data.prepare import is_val, unigram_ppl
from elas.data.sources import builtin_docs


def test_builtin_corpus_is_deterministic_and_machine_independent():
    a = [d for _, d in zip(range(30), builtin_docs())]
    b = [d for _, d in zip(range(30), builtin_docs())]
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(x[0].startswith(("stdlib/", "site-packages/")) for x in a)
    assert all(x[0].endswith((".py", ".md", ".rst", ".txt")) for x in a)


def test_prepared_dataset(dataset):
    meta = load_meta(dataset)
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    tr = np.memmap(dataset / "train.bin", dtype=np.uint16, mode="r")
    assert len(tr) == meta["train_tokens"] > 100_000 and tr.max() < 512
    assert (tr == meta["eot_id"]).sum() == meta["train_docs"]  # one EOT per document
    assert 1.0 < meta["unigram_val_ppl"] < 512
    assert meta["train_sha1"] == hashlib.sha1((dataset / "train.bin").read_bytes()).hexdigest()
    assert meta["val_sha1"] == hashlib.sha1((dataset / "val.bin").read_bytes()).hexdigest() != meta["train_sha1"]


def test_files_and_jsonl_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i}.txt").write_text(f"document number {i} says hello world " * 20)
    with open(src / "more.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"body": f"jsonl record {i} " * 10}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        prepare(tmp_path / "a", source="files", files=[str(src)], vocab_size=300, log=lambda *a: None)
    meta = prepare(tmp_path / "b", source="files", files=[str(src)], text_field="body", vocab_size=300,
                   val_frac=0.2, log=lambda *a: None)
    assert meta["train_docs"] + meta["val_docs"] == 80
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare(tmp_path / "b", source="files", files=[str(src)], text_field="body", log=lambda *a: None)



def test_prepare_never_removes_what_is_not_its_own(tmp_path, monkeypatch):
    """--out naming a directory of the user's texts (even with --force) or a file is refused before any text is
    read, and nothing there is touched; a dataset is replaced only with --force; an unwritable --out fails before
    the text is read; a temporary directory left by a killed prepare of the same --out is removed."""
    import sys
    prep = sys.modules["elas.data.prepare"]  # the module (elas.data.prepare is also the function's name)
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.txt").write_text(f"text {i} about tokens " * 30)
    (src / "NOTES.txt").write_text("mine")
    read = []
    monkeypatch.setattr(prep._Reader, "collect", lambda *a, **kw: read.append(1) or pytest.fail("text was read"))
    for force in (False, True):
        with pytest.raises(DataError, match=r"holds files that are not an elas dataset's \(NOTES.txt, doc0.txt, "
                                             r"doc1.txt, doc10.txt and 27 more\); .*nothing was removed"):
            prepare(src, source="files", files=[str(src)], vocab_size=300, force=force, log=lambda *a: None)
    assert len(list(src.iterdir())) == 31 and (src / "NOTES.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        prepare(tmp_path / "afile", source="files", files=[str(src)], log=lambda *a: None)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # (root writes anyway)
            with pytest.raises(DataError, match="cannot create dataset directory"):
                prepare(tmp_path / "ro" / "ds", source="files", files=[str(src)], log=lambda *a: None)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert not read
    monkeypatch.undo()
    stale = tmp_path / "ds.tmp-999999999"  # a process id that cannot be alive
    stale.mkdir()
    prepare(tmp_path / "ds", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    assert not stale.exists() and sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(prep.DATASET_FILES)
    prepare(tmp_path / "ds", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, force=True,
            log=lambda *a: None)

def test_empty_sources_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "prepare", "--out", str(tmp_path / "x"), "--source", "files", "--files",
                 str(tmp_path / "empty")]) == 2
    assert "no text files" in capsys.readouterr().err
    assert main(["data", "prepare", "--out", str(tmp_path / "x"), "--source", "files", "--files",
                 str(tmp_path / "nope*.txt")]) == 2
    assert "no files match" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_split_is_stable_and_about_the_right_size():
    ids = [f"stdlib/mod{i}.py" for i in range(20000)]
    frac = sum(is_val(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < frac < 0.06
    assert [is_val(i, 0.05) for i in ids[:100]] == [is_val(i, 0.05) for i in ids[:100]]


def test_unigram_ppl():
    train = np.array([0, 0, 1, 1])
    assert unigram_ppl(train, np.array([0, 1]), 2) == pytest.approx(2.0)


def test_batches_are_a_function_of_step_and_shard_exactly(dataset):
    w = TokenWindows(dataset, "train", 32)
    single = Batches(w, 8, seed=3)
    ranks = [Batches(w, 8, seed=3, rank=r, world=2) for r in range(2)]
    for step in (0, 1, 57, w.n // 8 + 1):  # includes an epoch boundary
        full = single.indices(step)
        assert np.array_equal(np.concatenate([r.indices(step) for r in ranks]), full)
        assert np.array_equal(Batches(w, 8, seed=3).indices(step), full)
    assert not np.array_equal(Batches(w, 8, seed=4).indices(0), single.indices(0))
    x, y = w.get(np.array([0, 5]))
    assert x.shape == (2, 32) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_meta(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_meta(tmp_path / "empty")


def test_a_missing_tokenizer_path_fails_at_once():
    """A --tokenizer value that can only be a local path (a .json name, ./, /, more than one /) is a one-line error
    at once, not after the hub's retries."""
    import time
    from elas.data.tokenizer import load_tokenizer
    for spec in ("nothere.json", "./tok", "/no/such/dir", "a/b/c"):
        t0 = time.time()
        with pytest.raises(ValueError, match=f"tokenizer '{spec}': no such file or directory"):
            load_tokenizer(spec)
        assert time.time() - t0 < 1.0


def test_the_builtin_dataset_is_prepared_however_its_path_is_spelled(tmp_path, monkeypatch):
    """data/builtin-8k as ./data/builtin-8k or its absolute path is still the built-in dataset, prepared on first
    use (it was refused as missing); any other missing directory is not prepared."""
    import types

    import elas.data
    from elas.cli import ensure_builtin_data
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(elas.data, "prepare", lambda d, **kw: calls.append((Path(d), kw["vocab_size"])))
    for spelled in ("data/builtin-8k", "./data/builtin-8k", str(tmp_path / "data" / "builtin-8k"),
                    "data/builtin-8k/"):
        ensure_builtin_data(types.SimpleNamespace(data_dir=spelled))
    assert [v for _, v in calls] == [8192] * 4
    ensure_builtin_data(types.SimpleNamespace(data_dir="data/mine"))
    assert len(calls) == 4


def _texts(d: Path, n: int = 30) -> Path:
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(f"document {i} about tokens and windows " * 40)
    return d


def test_a_token_file_of_another_length_than_meta_says_is_refused(tmp_path):
    """A token file a whole number of tokens shorter (a truncated copy) or longer than meta.json says is refused at
    start-up in one line, not trained on."""
    ds = tmp_path / "ds"
    meta = prepare(ds, source="files", files=[str(_texts(tmp_path / "t"))], vocab_size=300, val_frac=0.2,
                   log=lambda *a: None)
    load_meta(ds)
    for split, size in (("train", 2 * meta["train_tokens"] - 2000), ("val", 2 * meta["val_tokens"] + 2)):
        keep = (ds / f"{split}.bin").read_bytes()
        with open(ds / f"{split}.bin", "r+b") as fh:
            fh.truncate(size)
        with pytest.raises(DataError, match=rf"{split}.bin has {size} bytes, but meta.json says "
                                            rf"{meta[split + '_tokens']:,} uint16 tokens .*prepare it again"):
            TokenWindows(ds, "train", 32)
        (ds / f"{split}.bin").write_bytes(keep)
    TokenWindows(ds, "train", 32)


def test_prepare_writes_its_files_durably_before_naming_the_dataset(tmp_path, monkeypatch):
    """Every file of the dataset and its directory are fsynced before the directory takes its name, and the parent
    after: a machine crash never leaves a meta.json beside token files whose bytes were not written."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    ds = tmp_path / "ds"
    prepare(ds, source="files", files=[str(_texts(tmp_path / "t"))], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    at = events.index(("replace", "ds"))
    before = {ino for kind, ino in events[:at] if kind == "fsync"}
    assert {p.stat().st_ino for p in [ds, *ds.iterdir()]} <= before
    assert ("fsync", tmp_path.stat().st_ino) in events[at:]


def test_a_failed_tokenizer_write_is_one_line(tmp_path, monkeypatch):
    """tokenizer.json that cannot be written (a full disk) is the same one-line error as a token file, and the
    temporary directory goes."""
    import sys
    prep = sys.modules["elas.data.prepare"]
    real = prep._write_tokens

    def then_block(path, *a, **kw):  # tokenizer.json cannot be written: a directory holds its name
        n = real(path, *a, **kw)
        (path.parent / "tokenizer.json").mkdir(exist_ok=True)
        return n
    monkeypatch.setattr(prep, "_write_tokens", then_block)
    with pytest.raises(DataError, match="writing dataset .* failed: Is a directory"):
        prepare(tmp_path / "ds", source="files", files=[str(_texts(tmp_path / "t"))], vocab_size=300, val_frac=0.2,
                log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_given_tokenizer_neither_truncates_nor_pads_documents(tmp_path):
    """A tokenizer.json that configures truncation or padding (as some hub tokenizers do) tokenizes every document
    whole: the dataset is the same as with the tokenizer without them."""
    from tokenizers import Tokenizer
    texts = str(_texts(tmp_path / "t"))
    a = prepare(tmp_path / "a", source="files", files=[texts], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    tok.enable_truncation(16)
    tok.enable_padding(length=16)
    tok.save(str(tmp_path / "trunc.json"))
    b = prepare(tmp_path / "b", source="files", files=[texts], tokenizer=str(tmp_path / "trunc.json"), val_frac=0.2,
                log=lambda *a: None)
    assert (b["train_tokens"], b["train_sha1"]) == (a["train_tokens"], a["train_sha1"])
    # and the dataset keeps the tokenizer as it tokenized: the same bytes as a's (a transfer set's check compares them)
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()


def test_a_tokenizer_without_end_of_text_fails_before_the_text_is_read(tmp_path, monkeypatch):
    import sys
    prep = sys.modules["elas.data.prepare"]
    texts = str(_texts(tmp_path / "t"))
    prepare(tmp_path / "a", source="files", files=[texts], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    spec = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    spec["added_tokens"] = []
    del spec["model"]["vocab"]["<|endoftext|>"]
    (tmp_path / "noeot.json").write_text(json.dumps(spec))
    monkeypatch.setattr(prep._Reader, "collect", lambda *a, **kw: pytest.fail("text was read"))
    with pytest.raises(ValueError, match="no end-of-text token"):
        prepare(tmp_path / "b", source="files", files=[texts], tokenizer=str(tmp_path / "noeot.json"),
                log=lambda *a: None)


def test_a_vocab_size_other_than_the_given_tokenizers_is_refused_before_the_text_is_read(tmp_path, monkeypatch):
    """A given tokenizer keeps its own vocabulary: a different --vocab-size would be ignored, so it is an error (the
    tokenizer's own size, or none, is accepted)."""
    import sys
    prep = sys.modules["elas.data.prepare"]
    texts = str(_texts(tmp_path / "t"))
    prepare(tmp_path / "a", source="files", files=[texts], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    tok = str(tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(prep._Reader, "collect", lambda *a, **kw: pytest.fail("text was read"))
        with pytest.raises(DataError, match=r"vocab_size=512 differs from the vocabulary of tokenizer .* \(300 tokens\)"):
            prepare(tmp_path / "b", source="files", files=[texts], tokenizer=tok, vocab_size=512, log=lambda *a: None)
    for size in (300, None):
        meta = prepare(tmp_path / f"c{size}", source="files", files=[texts], tokenizer=tok, vocab_size=size,
                       val_frac=0.2, log=lambda *a: None)
        assert meta["vocab_size"] == 300


def test_a_users_files_are_never_skipped_silently(tmp_path, capsys):
    """--files text over the built-in corpus's 2 MB cap is read whole; a file that is not UTF-8 is a one-line error
    naming it, not dropped."""
    from elas.data.sources import file_docs
    d = _texts(tmp_path / "t", 3)
    (d / "big.txt").write_text("a long book " * 200_000)  # 2.4 MB
    assert sorted(i.rsplit("/", 1)[-1] for i, _ in file_docs([str(d)])) == ["big.txt", "doc0.txt", "doc1.txt",
                                                                             "doc2.txt"]
    (d / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert main(["data", "prepare", "--out", str(tmp_path / "x"), "--source", "files", "--files", str(d),
                 "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert "latin.txt is not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_single_document_says_how_to_split_it(tmp_path):
    """One file is one document: the error says to split it, not to add text or raise --val-frac."""
    (tmp_path / "book.txt").write_text("a single long book " * 1000)
    with pytest.raises(DataError, match=r"gave 1 document, .*one document per file.*split it"):
        prepare(tmp_path / "ds", source="files", files=[str(tmp_path / "book.txt")], vocab_size=300,
                log=lambda *a: None)


def test_bad_jsonl_records_are_one_line_errors(tmp_path):
    """A JSONL line that is not an object, a text field that is not a string, and bytes that are not UTF-8 are errors
    naming the file, not a traceback or made-up text; a null text is no document (it was the text "None")."""
    from elas.data.sources import SourceError, file_docs
    (tmp_path / "null.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    assert [t for _, t in file_docs([str(tmp_path / "null.jsonl")])] == ["a"]
    for body, msg in ((b'{"text": "a"}\n5\n', r"bad.jsonl:2: a number, not an object"),
                      (b'{"text": "a"}\n{"text": [1]}\n', r"bad.jsonl:2: field 'text' is an array, not a string"),
                      (b'{"text": "caf\xe9"}\n', r"bad.jsonl is not UTF-8 text")):
        (tmp_path / "bad.jsonl").write_bytes(body)
        with pytest.raises(SourceError, match=msg):
            list(file_docs([str(tmp_path / "bad.jsonl")]))


def test_prepare_says_each_stage_as_it_starts(tmp_path, monkeypatch):
    """The default log is flushed: in a log file or a pipe, each stage (reading, BPE, tokenizing) shows when it
    starts, not with the result at the end."""
    import io
    import sys
    prep = sys.modules["elas.data.prepare"]

    class Out(io.StringIO):
        shown = ""

        def flush(self):
            self.shown = self.getvalue()
    out = Out()
    seen = []
    real_bpe, real_write = prep.train_bpe, prep._write_tokens
    monkeypatch.setattr(prep, "train_bpe", lambda *a: seen.append(out.shown) or real_bpe(*a))
    monkeypatch.setattr(prep, "_write_tokens", lambda *a: seen.append(out.shown) or real_write(*a))
    monkeypatch.setattr(sys, "stdout", out)
    prepare(tmp_path / "ds", source="files", files=[str(_texts(tmp_path / "t"))], vocab_size=300, val_frac=0.2)
    assert "collected" in seen[0] and "training byte-level BPE" in seen[0]
    assert seen[1].splitlines()[-1].startswith("tokenizing ")
    assert out.shown.splitlines()[-1].startswith("wrote ")


def test_a_files_dataset_does_not_depend_on_how_its_paths_are_spelled(tmp_path, monkeypatch):
    """Documents are split into train/val by their id: their path below the directory (or glob root) given, so the
    same files give the same dataset from a relative or an absolute path, a glob, or after the folder moved."""
    import shutil
    from elas.data.sources import file_docs
    d = _texts(tmp_path / "t", 12)
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_text("a document one folder down\n" * 20)
    monkeypatch.chdir(tmp_path)
    want = sorted(file_docs([str(d)]))
    assert sorted(file_docs(["t"])) == want and sorted(file_docs(["./t/"])) == want
    assert ("sub/deep.txt", (d / "sub" / "deep.txt").read_text()) in want
    assert sorted(file_docs([str(d / "*.txt")])) == sorted(x for x in want if "/" not in x[0])
    assert sorted(file_docs([str(d / "doc0.txt")])) == [("doc0.txt", (d / "doc0.txt").read_text())]
    assert sorted(file_docs(["t", "t/sub/deep.txt"])) == want  # (one file by two specs: one document)
    quiet = dict(source="files", vocab_size=300, val_frac=0.3, log=lambda *a: None)
    a = prepare(tmp_path / "a", files=["t"], **quiet)
    shutil.move(str(d), str(tmp_path / "moved"))
    b = prepare(tmp_path / "b", files=[str(tmp_path / "moved")], **quiet)
    assert (a["train_sha1"], a["val_sha1"]) == (b["train_sha1"], b["val_sha1"])


def test_a_hugging_face_source_streams_its_text_field(tmp_path, monkeypatch):
    """--hf (offline here: a stand-in `datasets` module with the one call elas makes): documents by their record
    index, null texts skipped, a missing or non-text field and a failing stream each one line."""
    import sys
    import types
    from elas.data.sources import SourceError, hf_docs
    records = [{"text": f"record {i} of a streamed corpus " * 30, "id": i} for i in range(40)]
    records[3]["text"] = None
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "no/such":
            raise FileNotFoundError("Dataset 'no/such' doesn't exist on the Hub\nmore lines")
        return iter(records)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(hf_docs("org/corpus", "en", "train"))
    assert calls == [("org/corpus", "en", "train", True)]
    assert len(docs) == 39 and docs[0] == ("org/corpus:train:0", records[0]["text"]) and "org/corpus:train:3" \
        not in dict(docs)
    with pytest.raises(SourceError, match=r"^org/corpus record 0: no field 'content' \(fields: \['id', 'text'\]\)"):
        list(hf_docs("org/corpus", None, "train", "content"))
    with pytest.raises(SourceError, match=r"^org/corpus record 0: field 'id' is a number, not a string"):
        list(hf_docs("org/corpus", None, "train", "id"))
    with pytest.raises(SourceError, match=r"^could not stream 'no/such' \(FileNotFoundError: Dataset 'no/such' "
                                          r"doesn't exist on the Hub\); without network"):
        list(hf_docs("no/such", None, "train"))
    meta = prepare(tmp_path / "hf", source="hf", hf="org/corpus", hf_config="en", vocab_size=300, val_frac=0.2,
                   log=lambda *a: None)
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


def _word_corpus(d, n=40, words=300):
    d.mkdir()
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text(" ".join(f"w{(i * 7 + j) % 97}" for j in range(words)))
    return d


def test_max_tokens_streams_the_source_and_counts_the_documents_written(tmp_path, monkeypatch):
    import sys
    prep = sys.modules["elas.data.prepare"]  # (the module: elas.data.prepare is also the function's name)
    pulled = []

    def docs(specs, text_field="text", log=None):
        for i in range(3000):
            pulled.append(i)
            yield f"d{i}.txt", f"document {i} " + "lorem ipsum dolor sit amet " * 40

    monkeypatch.setattr(prep, "file_docs", docs)
    monkeypatch.setattr(prep, "DEFAULT_MB", 0.01)  # (the text held is at least this: 200 MB, a source read whole)
    meta = prepare(tmp_path / "d", source="files", files=["x"], vocab_size=300, max_mb=None, max_tokens=2000,
                   val_frac=0.2, log=lambda *a: None)
    tr = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert meta["train_tokens"] == len(tr) == 2000
    # a document cut short by the cap counts; none beyond it
    assert int((tr == meta["eot_id"]).sum()) <= meta["train_docs"] <= int((tr == meta["eot_id"]).sum()) + 1
    assert len(pulled) < 1000  # (all 3000 were read into memory)
    va = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert int((va == meta["eot_id"]).sum()) == meta["val_docs"] > 0


def test_max_tokens_past_the_source_or_the_mb_cap_is_said(tmp_path):
    src = _word_corpus(tmp_path / "t")
    msgs = []
    meta = prepare(tmp_path / "d", source="files", files=[str(src)], vocab_size=300, max_mb=0.02,
                   max_tokens=10**9, val_frac=0.2, log=msgs.append)
    assert meta["train_tokens"] < 10**9
    assert any("fewer than --max-tokens" in m and "--max-mb 0.02 capped" in m for m in msgs), msgs
    msgs.clear()
    prepare(tmp_path / "e", source="files", files=[str(src)], vocab_size=300, max_mb=None, max_tokens=10**9,
            val_frac=0.2, log=msgs.append)
    assert any("fewer than --max-tokens" in m and "the source ended" in m for m in msgs), msgs


def test_without_max_mb_the_text_read_is_capped_unless_max_tokens_says_where_to_stop(tmp_path, monkeypatch):
    """--max-mb not given: the default cap (200 MB) without --max-tokens; with it, the source is read until its
    tokens are written (the default cap silently stopped `--hf allenai/c4 --max-tokens N` at ~50M tokens). A source
    under the default cap comes out as it did without --max-tokens."""
    import sys
    prep = sys.modules["elas.data.prepare"]
    src = _word_corpus(tmp_path / "t", n=60)
    monkeypatch.setattr(prep, "DEFAULT_MB", 0.03)  # (~30 kB: about 25 of the 60 documents)
    capped = prepare(tmp_path / "a", source="files", files=[str(src)], vocab_size=300, val_frac=0.2,
                     log=lambda *a: None)
    whole = prepare(tmp_path / "b", source="files", files=[str(src)], vocab_size=300, val_frac=0.2,
                    max_tokens=10**9, log=lambda *a: None)
    assert capped["train_docs"] + capped["val_docs"] < 40 and whole["train_docs"] + whole["val_docs"] == 60
    monkeypatch.setattr(prep, "DEFAULT_MB", 1.0)  # (the whole source under it)
    a = prepare(tmp_path / "c", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    b = prepare(tmp_path / "e", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, max_tokens=10**9,
                log=lambda *a: None)
    assert a["train_sha1"] == b["train_sha1"] and a["val_sha1"] == b["val_sha1"]
    seen = {}
    import elas.data as data
    monkeypatch.setattr(data, "prepare", lambda out, **kw: seen.update(kw))
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), "--max-tokens", "1000"]) == 0
    assert seen["max_mb"] is None and seen["max_tokens"] == 1000


def test_an_out_that_is_a_symlink_to_a_directory_is_written_through(tmp_path):
    src = _word_corpus(tmp_path / "t")
    (tmp_path / "big").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "big", target_is_directory=True)
    prepare(tmp_path / "link", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "big" / "meta.json").is_file()


def test_one_separator_per_document_with_a_tokenizer_that_adds_its_own(tmp_path):
    from tokenizers import Tokenizer, processors
    src = str(_word_corpus(tmp_path / "t"))
    prepare(tmp_path / "a", source="files", files=[src], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    # T5's post-processor appends its end-of-text ("$A </s>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", eot)])
    tok.save(str(tmp_path / "t5like.json"))
    meta = prepare(tmp_path / "b", source="files", files=[src], tokenizer=str(tmp_path / "t5like.json"),
                   val_frac=0.2, log=lambda *a: None)
    tr = np.fromfile(tmp_path / "b" / "train.bin", dtype=np.uint16)
    assert int((tr == eot).sum()) == meta["train_docs"]
    # a tokenizer that prepends its BOS (Llama's "<s> $A") keeps it, as `elas generate` encodes prompts with it
    bos_name = tok.id_to_token(7)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos_name} $A", special_tokens=[(bos_name, 7)])
    tok.save(str(tmp_path / "bos.json"))
    meta = prepare(tmp_path / "c", source="files", files=[src], tokenizer=str(tmp_path / "bos.json"),
                   val_frac=0.2, log=lambda *a: None)
    tr = np.fromfile(tmp_path / "c" / "train.bin", dtype=np.uint16)
    starts = np.concatenate([[0], np.flatnonzero(tr == eot)[:-1] + 1])  # each document's first token
    assert int((tr == eot).sum()) == meta["train_docs"] and (tr[starts] == 7).all()


def test_a_files_directory_says_what_it_leaves_out(tmp_path):
    src = _word_corpus(tmp_path / "t", n=20)
    for i in range(20):
        (src / f"UPPER{i}.TXT").write_text("upper case extension " * 50)
    for i in range(3):
        (src / f"data{i}.json").write_text("{}")
    (src / "more.JSONL").write_text("".join(f'{{"text": "line {i} of a jsonl in capitals"}}\n' for i in range(5)))
    msgs = []
    meta = prepare(tmp_path / "d", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=msgs.append)
    assert meta["train_docs"] + meta["val_docs"] == 45  # (.TXT and .JSONL are taken: extensions in any case)
    assert any("left out 3 files" in m and "3 .json" in m for m in msgs), msgs


def test_unigram_ppl_does_not_copy_the_token_file():
    import tracemalloc
    tr = np.random.default_rng(0).integers(0, 32000, 8_000_000).astype(np.uint16)
    va = tr[:100_000]
    tracemalloc.start()
    got = unigram_ppl(tr, va, 32000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < tr.nbytes  # (np.bincount of the whole file: an int64 copy, 4x)
    counts = np.bincount(tr, minlength=32000) + 1.0
    assert got == pytest.approx(float(np.exp(-np.log(counts / counts.sum())[va].mean())), rel=1e-9)


def test_a_lone_surrogate_in_jsonl_names_its_file_and_line(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    lines = [json.dumps({"text": f"doc {i} " + "hello world " * 30}) for i in range(50)]
    lines.append('{"text": "broken emoji \\ud83d here"}')
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:51: .*unpaired surrogate"):
        prepare(tmp_path / "d", source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)


def test_a_force_rebuild_killed_at_any_point_leaves_a_whole_dataset(tmp_path, monkeypatch):
    """--force over a dataset: killed as the new dataset takes its name, the earlier one is still at --out (it was
    removed first, and the new one with the temporary directory: both lost); killed between moving the earlier one
    aside and renaming the new one in, the next prepare puts the earlier one back."""
    import sys
    prep = sys.modules["elas.data.prepare"]
    src, ds = _texts(tmp_path / "t"), tmp_path / "ds"
    kw = dict(source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    meta = prepare(ds, **kw)
    real = os.replace

    def killed_at_rename_in(a, b):
        if ".tmp-" in Path(a).name:
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(prep.os, "replace", killed_at_rename_in)
    with pytest.raises(KeyboardInterrupt):
        prepare(ds, force=True, **kw)
    monkeypatch.setattr(prep.os, "replace", real)
    assert load_meta(ds)["train_sha1"] == meta["train_sha1"] == prep.file_sha1(ds / "train.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "t"]
    # a process killed between the two renames (pid 99999999: gone) left the earlier dataset beside no --out
    real(ds, tmp_path / ("ds" + prep.REPLACED + "99999999"))
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare(ds, **kw)
    assert load_meta(ds)["train_sha1"] == meta["train_sha1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "t"]


def test_options_of_another_source_are_refused_before_the_text_is_read(tmp_path, capsys, monkeypatch):
    """--hf-split and --text-field (as --files and --hf) are refused with a source that would ignore them."""
    import elas.data
    monkeypatch.setattr(elas.data, "prepare", lambda *a, **k: pytest.fail("the text was read"))
    for flags, name in ((["--hf-split", "test"], "--hf-split"), (["--text-field", "body"], "--text-field")):
        assert main(["data", "prepare", "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert name in err and "--source builtin" in err


def test_a_directory_the_user_named_like_a_moved_aside_dataset_is_left_alone(tmp_path):
    """Only the directory a --force rebuild moved aside is put back or removed: a user's copy named
    <out>.old-<number> (a date, say) is neither deleted nor renamed to --out."""
    import shutil
    src, ds = _texts(tmp_path / "t"), tmp_path / "ds"
    kw = dict(source="files", files=[str(src)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    prepare(ds, **kw)
    backup = tmp_path / "ds.old-20240101"  # (no process 20240101)
    shutil.copytree(ds, backup)
    prepare(ds, force=True, **kw)
    assert (backup / "meta.json").is_file()
    shutil.rmtree(ds)
    prepare(ds, **kw)  # no --out: the user's copy is not taken for it
    assert (backup / "meta.json").is_file()
