"""Instruction data: Alpaca / ShareGPT / OpenAI-messages files -> masked token examples -> training batches.

Every record becomes one conversation of OpenAI-style messages, which a chat template (camelid.templates) turns
into token ids and labels: -100 everywhere but the assistant answers and the end-of-turn token after each.

Formats, detected per file from its records (a record that fits none is an error naming the file and index):
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}
  sharegpt  {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}
  messages  {"messages": [{"role", "content"}, ...]}  (other keys, such as KTO's "label", are ignored)
ShareGPT roles: human -> user, gpt -> assistant, system -> system, function_call -> assistant (the model writes
the call, so it is trained like any answer), observation -> tool (the tool's result is input, never trained).
A ShareGPT "tools" field (the function definitions) is appended to the system prompt, so the model sees the
tools it is trained to call.

Truncation never cuts an answer: a conversation longer than seq_len loses whole turns (a user message and all
that follows it up to the next one): the oldest first by default ("oldest"), or the newest ("newest"); a record
whose every single turn is still too long, or that has nothing to train on, is dropped. "drop" drops any record
that does not fit. Counts are kept per file in `SFTData.stats` and printed by `report()`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from camelid.templates import IGNORE_INDEX, Message, TemplateError, for_tokenizer
from camelid.tokenizer import Tokenizer

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
TRUNCATION = ("oldest", "newest", "drop")
_TAIL_SLACK = 16


class SFTDataError(ValueError):
    """An instruction data file or record that cannot be used."""


# ---- records -> conversations -------------------------------------------------------------------------------------

def parse_data_spec(spec: str) -> tuple[str, float]:
    """"data.json:0.3" -> ("data.json", 0.3); "data.json" -> ("data.json", 1.0). Only a trailing number after the
    last ':' is a ratio, so paths that hold ':' elsewhere still work."""
    path, sep, tail = str(spec).rpartition(":")
    if sep and path:
        try:
            ratio = float(tail)
        except ValueError:
            return str(spec), 1.0
        if not ratio > 0 or math.isinf(ratio):
            raise SFTDataError(f"{spec}: the mixing ratio must be a positive number, got {tail}")
        return path, ratio
    return str(spec), 1.0


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SFTDataError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: dict) -> list[Message]:
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "system")})
    for pair in record.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise SFTDataError("history must hold [query, answer] pairs")
        messages += [{"role": "user", "content": _text(pair[0], "history query")},
                     {"role": "assistant", "content": _text(pair[1], "history answer")}]
    query = _text(record["instruction"], "instruction")
    if record.get("input"):
        query += "\n" + _text(record["input"], "input")
    return messages + [{"role": "user", "content": query},
                       {"role": "assistant", "content": _text(record["output"], "output")}]


def _sharegpt(record: dict) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise SFTDataError("conversations must be a list")
    messages = []
    system = record.get("system") or ""
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SFTDataError(f"conversations[{i}] must be an object")
        who = turn.get("from", turn.get("role"))
        if who not in SHAREGPT_ROLES:
            raise SFTDataError(f"conversations[{i}]: unknown speaker {who!r} "
                               f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        content = _text(turn.get("value", turn.get("content")), f"conversations[{i}].value")
        if SHAREGPT_ROLES[who] == "system" and i == 0:
            system = content
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": content})
    tools = record.get("tools")
    if tools:
        tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = (system + "\n\n" if system else "") + "You can call these tools:\n" + tools
    return ([{"role": "system", "content": system}] if system else []) + messages


def _openai_messages(record: dict) -> list[Message]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise SFTDataError("messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES:
            raise SFTDataError(f"messages[{i}]: role must be one of {', '.join(MESSAGE_ROLES)}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    return out


_CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _openai_messages}


def to_messages(record: dict, fmt: str) -> list[Message]:
    """One record of the given format as a conversation of {"role", "content"} messages."""
    if fmt not in _CONVERTERS:
        raise SFTDataError(f"unknown format {fmt!r}")
    return _CONVERTERS[fmt](record)


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM, as Windows tools write, is not a record
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    json_lines = path.suffix.lower() == ".jsonl"
    if not json_lines:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise SFTDataError(f"{path}: not valid JSON ({e})") from None
            json_lines = True  # one value per line under a .json name, which `datasets` reads too
    if json_lines:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:  # e's own line is always 1: name the file's
                raise SFTDataError(f"{path}: line {number} is not valid JSON ({e.msg}, column {e.colno})") from None
        return records
    if not isinstance(records, list):
        raise SFTDataError(f"{path}: expected a JSON list of records (or .jsonl), got {type(records).__name__}")
    return records


def load_conversations(path: str | os.PathLike[str]) -> tuple[str, list[list[Message]]]:
    """(format, conversations) of one file; the format is detected from its records and must hold for all."""
    records = read_records(path)
    if not records:
        raise SFTDataError(f"{path}: no records")
    fmt, out = None, []
    for i, record in enumerate(records):
        found = detect_format(record)
        if found is None or (fmt is not None and found != fmt):
            expected = fmt or "alpaca (instruction + output), sharegpt (conversations) or messages (messages)"
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SFTDataError(f"{path}: record {i} does not fit {expected} (it has: {keys})")
        fmt = found
        try:
            out.append(to_messages(record, fmt))
        except SFTDataError as e:
            raise SFTDataError(f"{path}: record {i} ({fmt}): {e}") from None
    return fmt, out


# ---- conversations -> examples ------------------------------------------------------------------------------------

@dataclass
class Example:
    """One conversation, shifted for next-token prediction: labels[t] is the target after input_ids[t]."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Stats:
    records: int = 0
    kept: int = 0
    truncated: int = 0  # kept with some whole turns removed
    dropped_too_long: int = 0  # no single turn fits seq_len
    dropped_no_answer: int = 0  # nothing to train on (no assistant message)

    def __str__(self) -> str:
        return (f"{self.records} records: {self.kept} kept ({self.truncated} truncated by whole turns), "
                f"{self.dropped_too_long} dropped as too long, {self.dropped_no_answer} without an answer")


def _turns(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(system messages, turns): a turn starts at a user message and runs to the next one."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns: list[list[Message]] = []
    for m in messages[len(head):]:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return head, turns


def encode_conversation(template, tokenizer: Tokenizer, messages: list[Message], seq_len: int,
                        train_on_all: bool = False, truncation: str = "oldest") -> tuple[Example | None, str]:
    """(example or None, what happened: "kept" | "truncated" | "too_long" | "no_answer")."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    head, turns = _turns(messages)
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no_answer"
    # A conversation of n turns tries n, n-1, ... turns: the newest ones ("oldest" drops the oldest) or the first.
    tries = [turns] if truncation == "drop" else [turns[k:] if truncation == "oldest" else turns[:len(turns) - k]
                                                  for k in range(len(turns))]
    for kept in tries:
        if not any(m["role"] == "assistant" for t in kept for m in t):
            break  # what is left has nothing to train on
        # the slack lets untrained tokens after the last answer (trimmed below) not count against seq_len
        ids, labels = template.encode_for_training(tokenizer, head + [m for t in kept for m in t], train_on_all,
                                                   max_len=seq_len + 1 + _TAIL_SLACK)
        trained = [t for t, x in enumerate(labels or []) if x != IGNORE_INDEX and t > 0]
        if trained and trained[-1] <= seq_len:  # ids[:last + 1] -> inputs ids[:last], at most seq_len
            last = trained[-1]  # what follows the last answer ("\n", a dangling header) is never a target
            return Example(ids[:last], labels[1:last + 1]), "kept" if len(kept) == len(turns) else "truncated"
    return None, "too_long"


def encode_conversations(template, tokenizer: Tokenizer, conversations: Sequence[list[Message]], seq_len: int,
                         train_on_all: bool = False, truncation: str = "oldest") -> tuple[list[Example], Stats]:
    stats, out = Stats(records=len(conversations)), []
    for i, messages in enumerate(conversations):
        try:
            example, what = encode_conversation(template, tokenizer, messages, seq_len, train_on_all, truncation)
        except TemplateError as e:  # a model's Jinja template may refuse one record (a system role, ...)
            raise TemplateError(f"record {i}: {e}") from None
        if example is not None:
            out.append(example)
            stats.kept += 1
            stats.truncated += what == "truncated"
        elif what == "too_long":
            stats.dropped_too_long += 1
        else:
            stats.dropped_no_answer += 1
    return out, stats


# ---- examples -> batches ------------------------------------------------------------------------------------------

def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


def collate(examples: Sequence[Example], pad_id: int, seq_len: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """One example a row, right-padded (to a multiple of `multiple`, at most seq_len) with an attention_mask."""
    T = _round_up(max(len(e) for e in examples), multiple, seq_len)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e)] = torch.tensor(e.input_ids)
        labels[row, :len(e)] = torch.tensor(e.labels)
        mask[row, :len(e)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, seq_len: int,
                   multiple: int = 8) -> dict[str, torch.Tensor]:
    """Several examples a row. Each attends only to itself (a block-diagonal causal mask, (B, 1, T, T) bool) and
    its positions restart at 0, so a packed example computes exactly what it would alone."""
    T = _round_up(max(sum(len(e) for e in r) for r in rows), multiple, seq_len)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # the tail padding is one more "document": no row is empty
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, e in enumerate(row):
            n = len(e)
            ids[b, t:t + n], labels[b, t:t + n] = torch.tensor(e.input_ids), torch.tensor(e.labels)
            doc[b, t:t + n], pos[b, t:t + n] = d, torch.arange(n)
            t += n
        pos[b, t:] = torch.arange(T - t)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask[:, None], "position_ids": pos}


def _raw(seed: int, *key: int) -> np.random.PCG64:
    # PCG64's raw stream is stable across NumPy versions (see data/pretrain.window_starts)
    return np.random.PCG64(np.random.SeedSequence([seed, *key]))


def _split(n: int, fraction: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of n examples: a seeded permutation, held-out ones first."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    order = np.argsort(_raw(seed, 1 << 30, index).random_raw(n), kind="stable")
    k = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


@dataclass
class SFTData:
    """Encoded examples of one file and its share of the mixture."""

    path: str
    ratio: float
    format: str
    examples: list[Example]
    stats: Stats
    train: np.ndarray = field(default_factory=lambda: np.arange(0))
    held_out: np.ndarray = field(default_factory=lambda: np.arange(0))


def load_sft(spec: str, tokenizer: Tokenizer, template, seq_len: int, train_on_all: bool = False,
             truncation: str = "oldest") -> SFTData:
    """Read, detect, convert and encode one `path[:ratio]` data spec."""
    path, ratio = parse_data_spec(spec)
    fmt, conversations = load_conversations(path)
    try:
        examples, stats = encode_conversations(template, tokenizer, conversations, seq_len, train_on_all, truncation)
    except TemplateError as e:
        raise SFTDataError(f"{path}: {e}") from None
    if not examples:
        raise SFTDataError(f"{path}: no usable record for seq_len {seq_len} ({stats})")
    return SFTData(path, ratio, fmt, examples, stats)


class SFTBatches:
    """The fine-tuning BatchSource: a mixture of datasets by ratio, drawn per step.

    The examples of a step come from a PCG64 stream seeded by (seed, step) alone (with replacement: a dataset by
    ratio, then an example uniformly), so resuming at step s gives exactly the same batches. Micro-batch m on rank
    r takes the rows (m*world + r)*B .. (m*world + r + 1)*B of that draw: a step trains on its first
    micro_batch * grad_accum * world rows however that product is split. With `pack`, examples are laid into
    rows in draw order until the next one does not fit (it is then left out). eval_batches goes once, in order,
    over the held-out examples (eval_fraction of each dataset).
    """

    def __init__(self, datasets: Sequence[SFTData], seq_len: int, micro_batch: int, pad_id: int = 0,
                 pack: bool = False, seed: int = 0, eval_fraction: float = 0.0, max_eval_examples: int | None = None):
        if not datasets:
            raise SFTDataError("no datasets given")
        if micro_batch < 1 or seq_len < 2:
            raise ValueError(f"micro_batch must be >= 1 and seq_len >= 2, got {micro_batch} and {seq_len}")
        self.datasets, self.seq_len, self.micro_batch = list(datasets), seq_len, micro_batch
        self.pad_id, self.pack, self.seed, self.max_eval = pad_id, pack, seed, max_eval_examples
        for i, d in enumerate(self.datasets):
            longest = max((len(e) for e in d.examples), default=0)
            if longest > seq_len:
                raise ValueError(f"{d.path}: an example of {longest} tokens is longer than seq_len {seq_len}")
            d.train, d.held_out = _split(len(d.examples), eval_fraction, seed, i)
            if len(d.train) == 0:
                raise SFTDataError(f"{d.path}: no training examples left after holding out {eval_fraction:.0%}")
        weights = np.array([d.ratio for d in self.datasets], dtype=np.float64)
        self._cum = np.cumsum(weights / weights.sum())

    @classmethod
    def from_files(cls, specs: Sequence[str], tokenizer: Tokenizer, template=None, *, seq_len: int,
                   micro_batch: int, train_on_all: bool = False, truncation: str = "oldest", **kw) -> SFTBatches:
        """`template`: a template object, a built-in name, or None for the tokenizer's own chat_template."""
        tpl = template if template is not None and not isinstance(template, str) else for_tokenizer(tokenizer,
                                                                                                   template)
        datasets = [load_sft(s, tokenizer, tpl, seq_len, train_on_all, truncation) for s in specs]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        return cls(datasets, seq_len, micro_batch, pad_id=pad, **kw)

    def report(self) -> str:
        return "\n".join(f"{d.path} ({d.format}, ratio {d.ratio:g}): {d.stats}" for d in self.datasets)

    def _stream(self, step: int) -> Iterator[Example]:
        bits = _raw(self.seed, step)
        while True:
            raw = bits.random_raw(2 * 64)  # (dataset, example) pairs, 64 at a time
            for a, b in raw.reshape(-1, 2):
                d = self.datasets[min(int(np.searchsorted(self._cum, a / 2.0**64, side="right")),
                                      len(self.datasets) - 1)]
                yield d.examples[int(d.train[int(b % np.uint64(len(d.train)))])]

    def _rows(self, step: int, count: int) -> list[list[Example]]:
        stream, rows = self._stream(step), []
        if not self.pack:
            return [[next(stream)] for _ in range(count)]
        row, used = [], 0
        while len(rows) < count:
            e = next(stream)
            if row and used + len(e) > self.seq_len:
                rows.append(row)
                row, used = [], 0
                continue  # the example that did not fit is left out: the draw stays a pure function of the step
            row.append(e)
            used += len(e)
        return rows

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        # one draw per step, not per micro-batch: --resume (or --auto on another device) may re-split the global
        # batch into micro_batch x grad_accum x world, and the step must still see the same examples
        chunk = micro * world + rank
        rows = self._rows(step, (chunk + 1) * self.micro_batch)[chunk * self.micro_batch:]
        if self.pack:
            return collate_packed(rows, self.pad_id, self.seq_len)
        return collate([r[0] for r in rows], self.pad_id, self.seq_len)

    def eval_examples(self) -> list[Example]:
        out = [d.examples[int(i)] for d in self.datasets for i in d.held_out]
        return out[:self.max_eval]

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        examples = self.eval_examples()
        for i in range(0, len(examples), self.micro_batch):
            yield collate(examples[i:i + self.micro_batch], self.pad_id, self.seq_len)
