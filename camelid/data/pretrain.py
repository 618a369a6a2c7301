"""Pretraining data: text -> token shards on disk, and a memmap reader that cuts random windows from them.

A prepared folder holds two token streams, train and val, each cut into shard files:

    train_00000.bin ...   raw little-endian token ids: uint16 when every id fits (vocab <= 65536), else uint32
    val_00000.bin ...     the same for the validation split (none when it is empty)
    meta.json             dtype, vocab, special ids, hashes, per-split counts and shards; written last
    tokenizer.json ...    a copy of the tokenizer (+ tokenizer_config.json), so training finds it with the data

A stream is `doc EOS doc EOS ...`: no BOS, one EOS closing every document, as in GPT-2 / Llama pretraining, so
the model learns where documents end and a window may span several. A document is a .jsonl line's "text", a
.parquet row's "text", or a whole .txt/.md file. Text files are read in blocks of lines ("pieces", ~64 KB) so
workers share a long file and a one-file corpus still gets a validation split. Whether a piece goes to val is a
hash of (seed, piece index): the same on every run and for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from camelid.tokenizer import CONFIG_FILES, VOCAB_FILES, Tokenizer

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
TEXT_BLOCK_BYTES = 1 << 16  # a text file is cut (at line ends) into pieces about this big
CHUNK_BYTES = 1 << 21  # text per worker task: large enough that the inter-process copy is noise
_OURS = re.compile(r"(train|val)_\d{5}\.bin(\.tmp)?")  # files prepare() may replace or delete in the out folder

Piece = tuple[int, str, float]  # (document index, text, input bytes it came from: for the progress bar)


class DataError(ValueError):
    """Input that cannot become tokens (bad JSON, no "text", not UTF-8), or a damaged prepared folder."""


def token_dtype(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so 65536 ids still fit 16 bits: half the disk and page cache of uint32
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---- reading inputs ---------------------------------------------------------------------------------------------

def find_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Input files in a fixed order: as given, folders walked recursively in sorted order (hidden ones skipped)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            files += sorted(p for p in found if not any(s.startswith(".") for s in p.relative_to(path).parts))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"no such input file or folder: {path}")
    return files


def _text_blocks(path: Path) -> Iterator[tuple[str, int]]:
    block: list[str] = []
    size = 0
    with open(path, "rb") as f:  # bytes, split at b"\n" only: "\r\n" survives and the round trip is exact
        for lineno, raw in enumerate(f, 1):
            try:
                block.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
            size += len(raw)
            if size >= TEXT_BLOCK_BYTES:
                yield "".join(block), size
                block, size = [], 0
    if block:
        yield "".join(block), size


def _jsonl(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: no "text" string field')
            yield text, len(raw)


def _parquet(path: Path) -> Iterator[tuple[str, float]]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet inputs need it
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f'{path}: no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
        per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(f'{path}: the "text" column holds {type(text).__name__}, not strings')
                yield text or "", per_row  # a null row is an empty document: skipped
    except OSError as e:  # pyarrow's ArrowInvalid for a corrupt file is a ValueError already
        raise DataError(f"{path}: cannot read parquet ({e})") from None


def _pieces(files: list[Path]) -> Iterator[Piece]:
    """Every non-empty piece of every file, in order, tagged with the index of the document it belongs to."""
    doc = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".parquet"):
            for text, nbytes in (_jsonl if suffix == ".jsonl" else _parquet)(path):
                if text:
                    yield doc, text, nbytes
                    doc += 1
        else:  # the whole file is one document, however many pieces
            for text, nbytes in _text_blocks(path):
                yield doc, text, nbytes
            doc += 1


def texts(files: list[Path]) -> Iterator[str]:
    """The text `prepare` tokenizes, piece by piece: what a tokenizer for this data should be trained on."""
    return (text for _, text, _ in _pieces(files))


def _chunks(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    chunk: list[Piece] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[1])
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---- tokenizing -------------------------------------------------------------------------------------------------

class _Encoder:
    def __init__(self, tokenizer: Tokenizer, dtype: str) -> None:
        self.tokenizer, self.dtype = tokenizer, np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of all texts concatenated, no BOS/EOS (N,), and each text's token count (len(texts),)."""
        ids = self.tokenizer.encode_batch(texts, bos=False)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        try:
            return np.fromiter(chain.from_iterable(ids), self.dtype, count=int(lengths.sum())), lengths
        except OverflowError:
            raise DataError(f"the tokenizer produced an id that does not fit {self.dtype.name}") from None


_worker_encoder: _Encoder | None = None  # one per worker process, set by _init_worker; unused in the main process


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; rayon threads would oversubscribe
    _worker_encoder = _Encoder(Tokenizer(tokenizer_dir), dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None
    return _worker_encoder(texts)


def _tokenized(chunks: Iterator[list[Piece]], tokenizer: Tokenizer, tokenizer_dir: str, dtype: str, workers: int):
    """(chunk, (ids, lengths)) for every chunk, in input order whatever the number of workers."""
    if workers <= 1:  # in this process: no start-up, and tokenizers' own threads still run
        encode = _Encoder(tokenizer, dtype)
        for chunk in chunks:
            yield chunk, encode([text for _, text, _ in chunk])
        return
    with get_context().Pool(workers, _init_worker, (tokenizer_dir, dtype)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_in_worker, ([text for _, text, _ in chunk],))))
            if len(pending) >= 2 * workers:  # bounded read-ahead: Pool.imap would pull the whole corpus into memory
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _is_val(index: int, seed: int, val_fraction: float) -> bool:
    # a hash, not an RNG stream: piece i's split depends on (seed, i) alone.
    # Piece 0 always trains, so train is never empty.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return index > 0 and int.from_bytes(digest, "little") / 2**64 < val_fraction


class _SplitWriter:
    """One split's stream, `doc EOS doc EOS ...`, cut every shard_tokens tokens into <name>_NNNNN.bin.tmp files."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, shard_tokens: int, eos_id: int) -> None:
        self.folder, self.name, self.shard_tokens = folder, name, shard_tokens
        self.eos = np.array([eos_id], dtype)
        self.tokens = self.documents = 0
        self.shards: list[dict] = []
        self._doc: int | None = None
        self._file = None

    def add(self, doc: int, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self._doc is not None and doc != self._doc:  # EOS goes in lazily: a document's pieces may be split up
            self._write(self.eos)
            self.documents += 1
        self._doc = doc
        self._write(ids)

    def close(self) -> None:
        if self._doc is not None:
            self._write(self.eos)
            self.documents += 1
        if self._file:
            self._file.close()

    def discard(self) -> None:
        if self._file:
            self._file.close()
        for shard in self.shards:
            (self.folder / (shard["file"] + ".tmp")).unlink(missing_ok=True)

    def _write(self, ids: np.ndarray) -> None:
        while len(ids):
            if not self.shards or self.shards[-1]["tokens"] == self.shard_tokens:
                if self._file:
                    self._file.close()
                self.shards.append({"file": f"{self.name}_{len(self.shards):05d}.bin", "tokens": 0})
                self._file = open(self.folder / (self.shards[-1]["file"] + ".tmp"), "wb", buffering=1 << 20)
            n = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self._file.write(ids[:n].tobytes())
            self.shards[-1]["tokens"] += n
            self.tokens += n
            ids = ids[n:]


def _route(tokenized: Iterator, splits: dict[str, _SplitWriter], seed: int, val_fraction: float, bar: tqdm) -> None:
    """Send every tokenized piece to train or val. The newest piece is held back one step so that, if val is still
    empty at the end, the last piece can go there: val is never empty when val_fraction > 0 and there are >= 2."""
    held, index = None, 0
    for chunk, (ids, lengths) in tokenized:
        ends = np.cumsum(lengths).tolist()
        for (doc, _, _), a, b in zip(chunk, [0, *ends[:-1]], ends):
            if held:
                splits[held[0]].add(*held[1:])
            held = ("val" if _is_val(index, seed, val_fraction) else "train", doc, ids[a:b])
            index += 1
        bar.update(sum(nbytes for _, _, nbytes in chunk))
    if held:
        force_val = val_fraction > 0 and index >= 2 and splits["val"].tokens == 0
        splits["val" if force_val else held[0]].add(*held[1:])


# ---- prepare ----------------------------------------------------------------------------------------------------

def _sha256(files: Sequence[Path], bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
    return h.hexdigest()


def _tokenizer_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "tokenizer.json").is_file():
        return [path / "tokenizer.json"]
    return [path / n for n in VOCAB_FILES if (path / n).is_file()]


def prepare(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str],
            out_dir: str | os.PathLike[str], val_fraction: float = 0.005, workers: int | None = None,
            shard_tokens: int = 100_000_000, seed: int = 0, show_progress: bool = True) -> dict:
    """Tokenize text/jsonl/parquet inputs into train/val token shards in out_dir; returns meta.json's content.

    Does nothing (and returns the existing meta) when out_dir already holds this exact preparation: same input
    bytes in the same order, same tokenizer, same settings.
    """
    if not 0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = find_files(inputs)
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files in {', '.join(map(str, inputs))}")
    tok_path, out = Path(tokenizer_dir), Path(out_dir)
    if not tok_path.exists():
        raise FileNotFoundError(f"no such tokenizer folder: {tok_path}")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.eos_id is None:
        raise DataError(f"{tok_path}: the tokenizer has no EOS token, needed to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)

    sizes = [p.stat().st_size for p in files]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="hashing", disable=not show_progress) as bar:
        file_hashes = [_sha256([p], bar) for p in files]
    settings = dict(version=FORMAT_VERSION, tokenizer_sha256=_sha256(_tokenizer_files(tok_path)),
                    eos_id=tokenizer.eos_id, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
                    text_block_bytes=TEXT_BLOCK_BYTES,
                    files=[[p.suffix.lower(), h] for p, h in zip(files, file_hashes)])
    # the files' own bytes and order, not their paths: moving a corpus does not re-tokenize it
    content = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    try:
        old = read_meta(out)
        if old.get("content_sha256") == content and all(_shard_ok(out, old, s) for s in old["splits"]):
            if show_progress:
                print(f"already prepared: {out} (same inputs, tokenizer and settings)", file=sys.stderr)
            copy_tokenizer(tok_path, out)  # a folder prepared before the copy existed gets one; else a no-op
            return old
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # absent or unreadable: prepare afresh
        pass

    if workers is None:  # no more processes than ~chunks: each one loads the tokenizer
        workers = max(1, min(os.cpu_count() or 1, 8, sum(sizes) // CHUNK_BYTES + 1))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = {name: _SplitWriter(out, name, dtype, shard_tokens, tokenizer.eos_id) for name in ("train", "val")}
    try:
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar:
            tokenized = _tokenized(_chunks(_pieces(files)), tokenizer, str(tok_path), dtype.str, workers)
            _route(tokenized, splits, seed, val_fraction, bar)
        if splits["train"].tokens == 0:  # piece 0 always trains: an empty train split means no tokens at all
            raise DataError(f"no usable documents found in {', '.join(map(str, inputs))}")
        for split in splits.values():
            split.close()
    except BaseException:
        for split in splits.values():
            split.discard()
        if created and not any(out.iterdir()):  # a failed first run leaves no empty --out behind
            out.rmdir()
        raise

    meta = dict(version=FORMAT_VERSION, dtype=dtype.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                bos_id=tokenizer.bos_id, tokenizer_sha256=settings["tokenizer_sha256"], content_sha256=content,
                val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
                splits={name: {"tokens": s.tokens, "documents": s.documents, "shards": s.shards}
                        for name, s in splits.items()},
                inputs=[{"path": str(p), "bytes": n, "sha256": h} for p, n, h in zip(files, sizes, file_hashes)],
                seconds=round(time.perf_counter() - start, 3))
    _commit(out, meta)
    copy_tokenizer(tok_path, out)
    return meta


def copy_tokenizer(tok_path: Path, out: Path) -> None:
    """Copy the tokenizer files byte for byte into the prepared folder, so `camelid pretrain --data out` finds the
    tokenizer the data was made with (its hash is in meta.json) without --tokenizer. Files already identical are
    left alone; tokenizer files of an earlier, different tokenizer are removed (a stale tokenizer.json would win)."""
    folder = tok_path if tok_path.is_dir() else tok_path.parent
    if folder.resolve() == out.resolve():
        return
    if tok_path.is_file():  # a tokenizer.json given by its own path, whatever its name
        copies = {"tokenizer.json": tok_path}
    else:
        copies = {path.name: path for path in _tokenizer_files(tok_path)}
    copies.update({name: folder / name for name in CONFIG_FILES if (folder / name).is_file()})
    for name in (*VOCAB_FILES, *CONFIG_FILES):
        target = out / name
        if name not in copies:
            target.unlink(missing_ok=True)
        elif not (target.is_file() and target.read_bytes() == copies[name].read_bytes()):
            tmp = out / (name + ".tmp")
            shutil.copyfile(copies[name], tmp)
            os.replace(tmp, target)


def _commit(out: Path, meta: dict) -> None:
    # meta.json goes first and comes back last: in between the folder reads as "not prepared", never as a
    # meta.json that names half-replaced shards.
    (out / "meta.json").unlink(missing_ok=True)
    keep = {s["file"] for split in meta["splits"].values() for s in split["shards"]}
    for name in keep:
        os.replace(out / (name + ".tmp"), out / name)
    for path in out.iterdir():
        if _OURS.fullmatch(path.name) and path.name not in keep:  # shards of an older, longer preparation
            path.unlink()
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "meta.json")


# ---- reading shards ---------------------------------------------------------------------------------------------

def read_meta(path: str | os.PathLike[str]) -> dict:
    file = Path(path) / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no prepared data here (no meta.json): run `camelid data prepare` first")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(meta).__name__}: run `camelid data prepare` again")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{file}: format version {meta.get('version')}, this camelid reads {FORMAT_VERSION}: "
                        "run `camelid data prepare` again")
    missing = [key for key in ("dtype", "vocab_size", "eos_id", "bos_id", "splits") if key not in meta]
    if missing:
        raise DataError(f"{file}: no {missing[0]!r} (damaged?): run `camelid data prepare` again")
    if not _well_typed(meta):  # else a TypeError from numpy or from a check further on
        raise DataError(f"{file}: a value of the wrong type (damaged?): run `camelid data prepare` again")
    return meta


def _well_typed(meta: dict) -> bool:
    """The values read_meta's readers use: the dtype prepare writes, integer sizes and ids, and each split's
    {"tokens": int, "shards": [{"file": str, "tokens": int}, ...]}."""
    def shard_ok(shard) -> bool:
        return isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("tokens"), int)

    def split_ok(split) -> bool:
        return (isinstance(split, dict) and isinstance(split.get("tokens"), int)
                and isinstance(split.get("shards"), list) and all(map(shard_ok, split["shards"])))

    return (meta["dtype"] in ("uint16", "uint32") and isinstance(meta["vocab_size"], int)
            and all(isinstance(meta[k], (int, type(None))) for k in ("eos_id", "bos_id"))
            and isinstance(meta["splits"], dict) and all(map(split_ok, meta["splits"].values())))


def _shard_ok(folder: Path, meta: dict, split: str) -> bool:
    size = np.dtype(meta["dtype"]).itemsize
    return all((folder / s["file"]).is_file() and (folder / s["file"]).stat().st_size == s["tokens"] * size
               for s in meta["splits"][split]["shards"])


def window_starts(seed: int, step: int, count: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """`count` random window starts in [0, n_tokens - seq_len - 1] (a window reads seq_len + 1 tokens). (count,)

    Drawn from (seed, step) alone, so a run's data position is its step number: resuming at step s draws exactly
    the batches it would have, and DDP ranks each take a slice of one global draw (`starts[rank::world]`).
    """
    if n_tokens < seq_len + 1:
        raise ValueError(f"{n_tokens} tokens are fewer than seq_len + 1 = {seq_len + 1}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")
    # PCG64's raw stream is stable across NumPy versions, Generator.integers() is not promised to be;
    # the modulo bias is at most n_tokens / 2**64.
    raw = np.random.PCG64(np.random.SeedSequence([seed, step])).random_raw(count)
    return (raw % np.uint64(n_tokens - seq_len)).astype(np.int64)


class TokenData:
    """One split of a prepared folder as one token stream over memory-mapped shards (read lazily by the OS)."""

    def __init__(self, path: str | os.PathLike[str], split: str = "train") -> None:
        self.path, self.split = Path(path), split
        self.meta = meta = read_meta(path)
        if split not in meta["splits"]:
            raise ValueError(f"{path}: no split {split!r} (have {', '.join(meta['splits'])})")
        self.vocab_size, self.eos_id, self.bos_id = meta["vocab_size"], meta["eos_id"], meta["bos_id"]
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards = meta["splits"][split]["shards"]
        if not _shard_ok(self.path, meta, split) or sum(s["tokens"] for s in shards) != meta["splits"][split]["tokens"]:
            raise DataError(f"{path}: {split} shards are missing or do not match meta.json (truncated or replaced?): "
                            "run `camelid data prepare` again")
        self._shards = [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in shards]
        self._ends = np.cumsum([len(s) for s in self._shards], dtype=np.int64)  # (S,) where each shard stops
        self._len = int(self._ends[-1]) if len(self._ends) else 0

    def __len__(self) -> int:
        return self._len

    def _check(self, seq_len: int) -> None:
        if self._len < seq_len + 1:
            raise ValueError(f"{self.path}: the {self.split} split has {self._len} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")

    def _read(self, start: int, out: np.ndarray) -> None:
        """out[:] = stream[start : start + len(out)], walking over shard boundaries."""
        i = int(np.searchsorted(self._ends, start, side="right"))  # the shard holding `start`
        pos, filled = start - (int(self._ends[i - 1]) if i else 0), 0
        while filled < len(out):
            part = self._shards[i][pos : pos + len(out) - filled]
            out[filled : filled + len(part)] = part
            filled, i, pos = filled + len(part), i + 1, 0

    def window(self, starts: Sequence[int] | np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets at each start: x = stream[s : s+T], y = stream[s+1 : s+T+1]. (B, T) int64."""
        self._check(seq_len)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() > self._len - seq_len - 1):
            raise ValueError(f"window starts must be in [0, {self._len - seq_len - 1}] for seq_len {seq_len}")
        buf = np.empty((len(starts), seq_len + 1), np.int64)  # (B, T+1): one read per row, x and y share it
        for row, start in zip(buf, starts.tolist()):
            self._read(start, row)
        tokens = torch.from_numpy(buf)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The random batch of `step`: window(window_starts(seed, step, batch_size, len(self), seq_len), seq_len)."""
        return self.window(window_starts(seed, step, batch_size, self._len, seq_len), seq_len)

    def sequential_windows(self, seq_len: int, batch_size: int = 1,
                           max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows from the start of the split, in order: a deterministic evaluation pass."""
        self._check(seq_len)
        starts = np.arange(0, self._len - seq_len, seq_len)[:max_windows]  # the last start is <= len - seq_len - 1
        for i in range(0, len(starts), batch_size):
            yield self.window(starts[i : i + batch_size], seq_len)
