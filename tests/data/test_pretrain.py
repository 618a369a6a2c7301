"""Pretraining data: inputs -> token shards -> windows, checked token for token against direct encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from camelid.cli import main
from camelid.data import pretrain
from camelid.data.pretrain import DataError, TokenData, prepare, token_dtype, window_starts
from camelid.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"  # tests/data/ -> repo -> beside it

# multi-byte characters and "\r\n" on purpose: the round trip must be byte exact
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait, naïve façade, 日本語のテキスト, emoji 🦙.",
    "Line one\r\nLine two\n\nA paragraph after a blank line.\n",
    "  leading spaces and trailing tabs\t\t",
    "Numbers 0123456789 and punctuation !?;:()[]{}",
    "Camelids include llamas, alpacas, vicuñas and guanacos.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(DOCS * 20), encoding="utf-8")
    Tokenizer.train([corpus], 300, show_progress=False).save(folder / "tok")
    return folder / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer(tok_dir)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def many_docs(n: int) -> list[str]:
    return [f"{DOCS[i % len(DOCS)]} (document {i})" for i in range(n)]


def stream(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
             for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def documents(ids: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a `doc EOS doc EOS ...` stream back into its documents (the stream must end with EOS)."""
    assert len(ids) == 0 or ids[-1] == tok.eos_id
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(part[:-1], skip_special_tokens=False) for part in np.split(ids, cuts + 1)[:-1]]


def expected_stream(texts: list[str], tok: Tokenizer) -> np.ndarray:
    return np.array([i for t in texts for i in tok.encode(t, bos=False) + [tok.eos_id]], np.int64)


# ---- prepare --------------------------------------------------------------------------------------------------

def test_dtype_is_the_smallest_that_holds_every_id():
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_jsonl_round_trip_is_exact(tmp_path, tok_dir, tok):
    meta = prepare([write_jsonl(tmp_path / "d.jsonl", DOCS)], tok_dir, tmp_path / "out", val_fraction=0,
                   show_progress=False)
    ids = stream(tmp_path / "out", "train")
    np.testing.assert_array_equal(ids, expected_stream(DOCS, tok))  # no BOS, one EOS after every document
    assert documents(ids, tok) == DOCS
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    assert meta["splits"]["train"]["tokens"] == len(ids) and meta["splits"]["train"]["documents"] == len(DOCS)
    assert meta["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_folder_of_text_markdown_and_jsonl(tmp_path, tok_dir, tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    (src / "a.txt").write_bytes(DOCS[2].encode())  # a text file is one document, "\r\n" kept
    (src / "sub" / "b.md").write_text(DOCS[1], encoding="utf-8")
    write_jsonl(src / "c.jsonl", [DOCS[0], "", DOCS[3]])  # an empty text is skipped, not an empty document
    (src / "notes.csv").write_text("ignored")
    (src / ".hidden" / "x.txt").write_text("ignored")
    prepare([src], tok_dir, tmp_path / "out", val_fraction=0, show_progress=False)
    # sorted walk: a.txt, c.jsonl, sub/b.md
    assert documents(stream(tmp_path / "out", "train"), tok) == [DOCS[2], DOCS[0], DOCS[3], DOCS[1]]


def test_parquet(tmp_path, tok_dir, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [DOCS[0], None, DOCS[1]], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    prepare([tmp_path / "d.parquet"], tok_dir, tmp_path / "out", val_fraction=0, show_progress=False)
    assert documents(stream(tmp_path / "out", "train"), tok) == [DOCS[0], DOCS[1]]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match='no "text" column'):
        prepare([tmp_path / "bad.parquet"], tok_dir, tmp_path / "out2", show_progress=False)


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"d\.parquet: reading \.parquet needs pyarrow"):
        prepare([tmp_path / "d.parquet"], tok_dir, tmp_path / "out", show_progress=False)


def test_long_text_file_is_cut_into_pieces_but_stays_one_document(tmp_path, tok_dir, tok, monkeypatch):
    monkeypatch.setattr(pretrain, "TEXT_BLOCK_BYTES", 200)
    lines = [" ".join(DOCS[i % len(DOCS)].split()) + f" {i}\n" for i in range(200)]  # one line each
    (tmp_path / "book.txt").write_text("".join(lines), encoding="utf-8")
    prepare([tmp_path / "book.txt"], tok_dir, tmp_path / "whole", val_fraction=0, show_progress=False)
    assert documents(stream(tmp_path / "whole", "train"), tok) == ["".join(lines)]  # no EOS between pieces

    meta = prepare([tmp_path / "book.txt"], tok_dir, tmp_path / "split", val_fraction=0.2, show_progress=False)
    train, val = (documents(stream(tmp_path / "split", s), tok) for s in ("train", "val"))
    assert len(train) == len(val) == 1 and meta["splits"]["val"]["documents"] == 1  # one-file corpus still has val
    assert sorted(train[0].splitlines(True) + val[0].splitlines(True)) == sorted(lines)


def test_val_split_is_by_document_stable_and_never_empty(tmp_path, tok_dir, tok):
    docs = many_docs(60)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([src], tok_dir, tmp_path / "a", val_fraction=0.2, show_progress=False)
    train, val = (documents(stream(tmp_path / "a", s), tok) for s in ("train", "val"))
    assert 0 < len(val) < len(train) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and train[0] == docs[0]  # order kept, piece 0 always trains
    assert meta["splits"]["val"]["documents"] == len(val)
    again = prepare([src], tok_dir, tmp_path / "b", val_fraction=0.2, show_progress=False)
    assert again["splits"] == meta["splits"]
    other_seed = prepare([src], tok_dir, tmp_path / "c", val_fraction=0.2, seed=1, show_progress=False)
    assert documents(stream(tmp_path / "c", "val"), tok) != val and other_seed["seed"] == 1
    # a fraction too small to pick anything still gives val one document: the last
    prepare([write_jsonl(tmp_path / "three.jsonl", DOCS[:3])], tok_dir, tmp_path / "d", val_fraction=1e-9,
            show_progress=False)
    assert documents(stream(tmp_path / "d", "val"), tok) == [DOCS[2]]
    two = write_jsonl(tmp_path / "two.jsonl", DOCS[:2])
    for seed in range(8):  # whatever the hashes say, two documents make one train and one val document
        prepare([two], tok_dir, tmp_path / "e", val_fraction=0.5, seed=seed, show_progress=False)
        assert [documents(stream(tmp_path / "e", s), tok) for s in ("train", "val")] == [[DOCS[0]], [DOCS[1]]]


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(pretrain, "CHUNK_BYTES", 300)  # many tasks, so two workers really interleave
    src = write_jsonl(tmp_path / "d.jsonl", many_docs(80))
    metas = [prepare([src], tok_dir, tmp_path / f"w{n}", val_fraction=0.1, workers=n, shard_tokens=500,
                     show_progress=False) for n in (1, 2)]
    assert metas[0]["splits"] == metas[1]["splits"] and len(metas[0]["splits"]["train"]["shards"]) > 2
    for shard in metas[0]["splits"]["train"]["shards"] + metas[0]["splits"]["val"]["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()


def test_rerun_is_a_no_op_and_a_changed_input_re_prepares(tmp_path, tok_dir, tok, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", many_docs(40))
    out = tmp_path / "out"
    meta = prepare([src], tok_dir, out, shard_tokens=100, show_progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(pretrain, "_tokenized", boom)
        assert prepare([str(src)], tok_dir, out, shard_tokens=100) == meta
    assert "already prepared" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    write_jsonl(src, DOCS[:2])  # fewer tokens: fewer shards, and the old extra shards must go
    new = prepare([src], tok_dir, out, shard_tokens=100, val_fraction=0, show_progress=False)
    assert new["content_sha256"] != meta["content_sha256"]
    assert documents(stream(out, "train"), tok) == DOCS[:2]
    files = {s["file"] for s in new["splits"]["train"]["shards"]}
    assert {p.name for p in out.iterdir()} == files | {"meta.json", "tokenizer.json", "tokenizer_config.json"}


def test_a_failed_prepare_keeps_the_old_data(tmp_path, tok_dir, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    prepare([src], tok_dir, out, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_jsonl(src, DOCS + ["one more"])

    def crash(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "_tokenized", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tok_dir, out, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old meta + shards intact, no temp files


def test_the_tokenizer_is_copied_next_to_the_data(tmp_path, tok_dir, tok):
    from camelid.train.config import TrainConfig
    from camelid.train.pretrain import find_tokenizer

    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prepare([src], tok_dir, out, show_progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # byte for byte: meta's tokenizer hash still matches
        assert (out / name).read_bytes() == (tok_dir / name).read_bytes()
    found, notes = find_tokenizer(TrainConfig(model="tiny", data=str(out)), meta)  # pretrain without --tokenizer
    assert found.vocab_size == tok.vocab_size and found.eos_id == tok.eos_id and str(out) in notes[0]
    assert len(notes) == 1  # no "differs byte-wise from the tokenizer the data was prepared with" warning

    # a re-run with another tokenizer replaces the copy; a vocab + merges tokenizer leaves no stale tokenizer.json
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    vocab = {t: i for i, t in enumerate(sorted(json.loads(tok._tok.to_str())["model"]["vocab"]))}
    (gpt2 / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (gpt2 / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (gpt2 / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}), encoding="utf-8")
    prepare([src], gpt2, out, show_progress=False)
    assert not (out / "tokenizer.json").exists()
    assert {p.name for p in out.iterdir() if not p.name.endswith(".bin")} == {
        "meta.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert Tokenizer(out).vocab_size == Tokenizer(gpt2).vocab_size

    # a folder prepared before the copy existed gets it on the next (otherwise no-op) run
    (out / "vocab.json").unlink()
    prepare([src], gpt2, out, show_progress=False)
    assert (out / "vocab.json").read_bytes() == (gpt2 / "vocab.json").read_bytes()


@pytest.mark.parametrize("name, content, error, match", [
    ("missing.txt", None, FileNotFoundError, "no such input"),
    ("", None, DataError, "no .txt"),  # the folder itself, which holds only a .csv
    ("e.jsonl", b'{"text": ""}\n\n', DataError, "no usable documents"),
    ("x.jsonl", b'{"text": "a"}\n{oops\n', DataError, r"x\.jsonl:2: not valid JSON"),
    ("x.jsonl", b'{"body": "a"}\n', DataError, r'x\.jsonl:1: no "text"'),
    ("x.txt", b"ok\n\xff\xfe\n", DataError, r"x\.txt:2: not UTF-8"),
    ("x.json", b"[]", DataError, "unsupported file type"),
])
def test_bad_input(tmp_path, tok_dir, name, content, error, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ignored.csv").write_text("a,b")
    if content is not None:
        (src / name).write_bytes(content)
    with pytest.raises(error, match=match):
        prepare([src / name], tok_dir, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # a failed first run leaves no empty folder behind
    (tmp_path / "out").mkdir()  # one that was there before stays, empty
    with pytest.raises(error, match=match):
        prepare([src / name], tok_dir, tmp_path / "out", show_progress=False)
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())


def test_bad_settings(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        prepare([src], tmp_path / "no-tok", tmp_path / "out", show_progress=False)
    for fraction in (-0.1, 0.6):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare([src], tok_dir, tmp_path / "out", val_fraction=fraction, show_progress=False)


# ---- reading --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tok_dir) -> Path:
    """A prepared folder whose train split is cut into many 7-token shards."""
    folder = tmp_path_factory.mktemp("sharded")
    prepare([write_jsonl(folder / "d.jsonl", many_docs(12))], tok_dir, folder / "out", val_fraction=0.2,
            shard_tokens=7, show_progress=False)
    return folder / "out"


def test_window_targets_shift_by_one_across_shard_boundaries(sharded):
    data, ids = TokenData(sharded), stream(sharded, "train")
    assert len(data) == len(ids) and len(data.meta["splits"]["train"]["shards"]) > 10
    assert data.vocab_size == data.meta["vocab_size"]
    T = 16
    starts = np.arange(len(ids) - T)  # every valid start, so every shard boundary is crossed at every offset
    x, y = data.window(starts, T)
    assert x.shape == y.shape == (len(starts), T) and x.dtype == y.dtype == torch.int64
    want = np.stack([ids[s : s + T + 1] for s in starts])
    np.testing.assert_array_equal(x.numpy(), want[:, :-1])
    np.testing.assert_array_equal(y.numpy(), want[:, 1:])
    with pytest.raises(ValueError, match="window starts"):
        data.window([len(ids) - T], T)


def test_window_starts_depend_on_seed_and_step_only():
    a = window_starts(seed=3, step=10, count=64, n_tokens=1000, seq_len=100)
    np.testing.assert_array_equal(a, window_starts(3, 10, 64, 1000, 100))
    assert a.dtype == np.int64 and a.shape == (64,)
    assert not np.array_equal(a, window_starts(3, 11, 64, 1000, 100))
    assert not np.array_equal(a, window_starts(4, 10, 64, 1000, 100))
    edge = window_starts(0, 0, 2000, n_tokens=10, seq_len=7)  # valid starts: 0, 1, 2 (a window reads 8 tokens)
    assert set(edge.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="fewer than seq_len"):
        window_starts(0, 0, 1, n_tokens=8, seq_len=8)


def test_batch_is_window_of_window_starts(sharded):
    data = TokenData(sharded)
    x, y = data.batch(seed=1, step=5, batch_size=4, seq_len=8)
    x2, y2 = data.window(window_starts(1, 5, 4, len(data), 8), 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_sequential_windows_cover_the_split_in_order(sharded):
    data, ids = TokenData(sharded, "val"), stream(sharded, "val")
    T = 5
    xs, ys = zip(*data.sequential_windows(T, batch_size=3))
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == (len(ids) - 1) // T and all(len(b) == 3 for b in xs[:-1])
    np.testing.assert_array_equal(x.reshape(-1).numpy(), ids[: len(x) * T])
    np.testing.assert_array_equal(y.reshape(-1).numpy(), ids[1 : len(x) * T + 1])
    assert len(torch.cat([b for b, _ in data.sequential_windows(T, max_windows=2)])) == 2


def test_reader_errors(tmp_path, sharded):
    with pytest.raises(FileNotFoundError, match="camelid data prepare"):
        TokenData(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenData(sharded, "val").window([0], 10_000)
    with pytest.raises(ValueError, match="no split"):
        TokenData(sharded, "test")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sharded.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    with open(broken / "train_00001.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match="do not match meta.json"):
        TokenData(broken)


@pytest.mark.parametrize("text", ["[]", '{"version": 1}'])
def test_a_meta_json_of_the_wrong_shape_is_a_data_error(tmp_path, text):
    """A list (AttributeError) or a meta.json without splits / dtype (KeyError) was a traceback."""
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(DataError, match="meta.json"):
        TokenData(tmp_path)


@pytest.mark.parametrize("damage", [
    lambda m: m.update(dtype="float99"),  # numpy's 'data type not understood' TypeError
    lambda m: m.update(vocab_size=None),  # a TypeError from pretrain's vocabulary check
    lambda m: m["splits"].update(train=5),
    lambda m: m["splits"]["train"]["shards"][0].update(file=5),
])
def test_a_meta_json_value_of_the_wrong_type_is_a_data_error(tmp_path, sharded, damage):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sharded.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    meta = json.loads((broken / "meta.json").read_text())
    damage(meta)
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json.*camelid data prepare"):
        TokenData(broken)


# ---- CLI --------------------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "camelid", "data", "prepare", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli(tmp_path, tok_dir, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", many_docs(30))
    args = ["--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]
    first = run_cli(*args, "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "train: " in first.stdout and "uint16" in first.stdout and "tokens/s" in first.stdout
    assert TokenData(tmp_path / "out", "val").meta["val_fraction"] == 0.1
    missing = run_cli("--input", str(tmp_path / "nope.txt"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.txt" in missing.stderr

    # the rest in-process: the same main(), without paying for a Python start each time
    assert main(["data", "prepare", *args]) == 0 and "already prepared" in capsys.readouterr().err
    assert main(["data", "prepare", *args[:6], "--val-fraction", "0.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_fraction" in err


# ---- real data --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (FIXTURES / "data" / "c4_demo.jsonl").is_file(), reason="needs ../shared/fixtures")
def test_c4_with_the_llama3_tokenizer(tmp_path):
    tok_dir = FIXTURES / "tokenizers" / "llama3"
    records = [json.loads(line)["text"] for line in (FIXTURES / "data" / "c4_demo.jsonl").open(encoding="utf-8")]
    meta = prepare([FIXTURES / "data" / "c4_demo.jsonl"], tok_dir, tmp_path / "out", val_fraction=0.05,
                   workers=2, show_progress=False)
    tok = Tokenizer(tok_dir)
    assert meta["vocab_size"] == 128256 and meta["dtype"] == "uint32"
    encoded = [tok.encode(t, bos=False) + [tok.eos_id] for t in records if t]
    splits = meta["splits"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == sum(map(len, encoded))
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(encoded) and splits["val"]["documents"]
    got = []  # every document's tokens, exactly, from one split or the other
    for split in ("train", "val"):
        ids = stream(tmp_path / "out", split)
        got += [part.tolist() for part in np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]]
    assert sorted(got) == sorted(encoded)
