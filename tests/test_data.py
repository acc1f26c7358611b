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
    monkeypatch.setattr(prep, "_collect", lambda *a, **kw: read.append(1) or pytest.fail("text was read"))
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
