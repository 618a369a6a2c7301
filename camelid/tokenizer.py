"""Tokenizer: a thin layer over the HF `tokenizers` library (tokenizer.json).

It adds what the rest of camelid needs and `tokenizers` leaves to transformers:
special-token ids read from tokenizer_config.json, stop ids for generation, a
BOS policy that never doubles BOS, an incremental detokenizer for streaming,
and byte-level BPE training. `transformers` is deliberately not imported.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from camelid.files import atomic_write_text

# Used only when tokenizer_config.json does not name the token at all (an explicit null means "none").
# The files of a tokenizer folder. VOCAB_FILES define the ids (tokenizer.json, or GPT-2 style vocab + merges, which
# Tokenizer reads when there is no tokenizer.json); CONFIG_FILES name the special tokens and hold the chat template;
# FILES adds what Hugging Face saves besides (`camelid merge` / `quantize` copy them all along).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "encoder.json", "merges.txt", "vocab.bpe")
CONFIG_FILES = ("tokenizer_config.json", "chat_template.jinja")
FILES = (*VOCAB_FILES, *CONFIG_FILES, "special_tokens_map.json", "tokenizer.model")

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>")
# End-of-turn markers of the common chat formats: generation must stop on them, not only on eos.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # control bytes, space, ...: shifted past 255
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


class TokenizerError(ValueError):
    """A tokenizer file exists but cannot be used (corrupt JSON, unknown format)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object of settings, got {type(value).__name__}")
    return value


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as "<s>" or as {"content": "<s>", ...}.
    return value.get("content") if isinstance(value, dict) else value


def _load_backend(path: Path) -> _HFTokenizer:
    """Load tokenizer.json, or build GPT-2 style byte-level BPE from vocab + merges files."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        try:
            return _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{file}: cannot load tokenizer ({msg})") from None
    if path.is_dir():
        vocab = next((path / n for n in ("vocab.json", "encoder.json") if (path / n).is_file()), None)
        merges = next((path / n for n in ("merges.txt", "vocab.bpe") if (path / n).is_file()), None)
        if vocab and merges:
            tok = _HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            if tok.token_to_id("<|endoftext|>") is not None:
                tok.add_special_tokens(["<|endoftext|>"])  # otherwise it is split into bytes
            return tok
    raise FileNotFoundError(f"no tokenizer.json found at {file}")


class Tokenizer:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        self._tok = _load_backend(path)
        cfg = _read_json(folder / "tokenizer_config.json")
        self._config = cfg
        for key in ("bos_token", "eos_token", "pad_token"):  # tokenizers' own error would name neither file nor key
            if not isinstance(_token_str(cfg.get(key)), (str, type(None))):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {key} must be a token's text (or "
                                     f'{{"content": text}}), got {cfg[key]!r}')
        self.bos_id = self._special_id(cfg, "bos_token", _BOS_NAMES)
        self.eos_id = self._special_id(cfg, "eos_token", _EOS_NAMES)
        self.pad_id = self._special_id(cfg, "pad_token", _PAD_NAMES)
        self.add_bos: bool = bool(cfg.get("add_bos_token", True)) and self.bos_id is not None
        self.model_max_length: int | None = cfg.get("model_max_length")
        self.chat_template = self._chat_template(folder, cfg)
        self.stop_ids = self._stop_ids(folder)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls(path)

    @classmethod
    def _from_backend(cls, tok: _HFTokenizer, bos: str | None, eos: str | None, pad: str | None) -> Tokenizer:
        self = cls.__new__(cls)
        self._tok, self._config = tok, {}
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(t) if t else None for t in (bos, eos, pad))
        self.add_bos = self.bos_id is not None
        self.model_max_length, self.chat_template = None, None
        self.stop_ids = {self.eos_id} if self.eos_id is not None else set()
        return self

    # ---- special tokens -------------------------------------------------------------------

    def _special_id(self, cfg: dict[str, Any], key: str, fallbacks: tuple[str, ...]) -> int | None:
        if key in cfg:
            name = _token_str(cfg[key])
            return self._tok.token_to_id(name) if name else None
        return next((i for n in fallbacks if (i := self._tok.token_to_id(n)) is not None), None)

    @staticmethod
    def _chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # older format: [{"name": "default", "template": "..."}, ...]
            default = next((t for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
            tpl = default and default.get("template", default)  # an entry without a template is refused below
        if not isinstance(tpl, (str, type(None))):  # jinja's own error names no file
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a Jinja template (a "
                                 f"string), got {tpl!r}"[:300])
        jinja = folder / "chat_template.jinja"  # where transformers >= 4.47 saves it
        if tpl is None and jinja.is_file():
            tpl = jinja.read_text(encoding="utf-8")
        return tpl

    def _stop_ids(self, folder: Path) -> set[int]:
        stops = {self.eos_id} if self.eos_id is not None else set()
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(folder / name).get("eos_token_id")
            ids = [eos] if isinstance(eos, int) else eos or []
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise TokenizerError(f"{folder / name}: eos_token_id must be a token id or a list of them, got {eos!r}")
            stops.update(ids)
        stops.update(i for n in _END_OF_TURN if (i := self._tok.token_to_id(n)) is not None)
        return stops

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens <0x00>..<0xFF> (empty for byte-level BPE)."""
        ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    @cached_property
    def _byte_level(self) -> bool:
        """True for byte-level BPE (GPT-2, Llama 3): each character of a token stands for one byte."""
        decoder = self._tok.decoder
        return decoder is not None and '"ByteLevel"' in decoder.__getstate__().decode()

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for, on its own (OpenAI's logprobs `bytes`: a character may span tokens, so
        a token's text alone can be invalid UTF-8). SentencePiece's "▁" is a space."""
        token = self.id_to_token(i)
        if token is None:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if i in self._added_ids:
            return token.encode()
        if i in self.byte_fallback_ids:  # "<0xE4>"
            return bytes([int(token[3:5], 16)])
        if self._byte_level:
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return token.replace("\u2581", " ").encode()

    @cached_property
    def drops_leading_space(self) -> bool:
        """True when decode drops the leading space of its text, as SentencePiece decoders do ("▁Paris" alone is
        "Paris": Llama 2, Mistral); byte-level BPE keeps it."""
        last = self.encode("a b", bos=False)[-1]
        return self.token_bytes(last).startswith(b" ") and not self.decode([last]).startswith(" ")

    # ---- encode / decode ------------------------------------------------------------------

    def _fix_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        # The post-processor may or may not add BOS (some Llama 3 tokenizer.json copies do not),
        # and a rendered chat template may already start with it: normalise to exactly one.
        if bos and self.add_bos:
            start = 0
            while start < len(ids) and ids[start] == self.bos_id:
                start += 1
            ids = [self.bos_id, *ids[start:]]
        if eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._fix_specials(self._tok.encode(text, add_special_tokens=bos).ids, bos, eos)

    def encode_batch(self, texts: Iterable[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=bos)
        return [self._fix_specials(e.ids, bos, eos) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ---- training / saving ----------------------------------------------------------------

    @classmethod
    def train(
        cls,
        files: Iterable[str | os.PathLike[str]],
        vocab_size: int,
        special_tokens: Iterable[str] = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"),
        min_frequency: int = 2,
        show_progress: bool = True,
        texts: Iterable[str] | None = None,
    ) -> Tokenizer:
        """Byte-level BPE like GPT-2 / Llama 3: any byte string encodes, no <unk> ever.

        Trains on the files' raw text, or on `texts` when given (then `files` is ignored).
        special_tokens are (bos, eos, pad, extra...) in that order; they get the first ids.
        """
        special = list(special_tokens)
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
            show_progress=show_progress,
        )
        if texts is not None:
            tok.train_from_iterator(texts, trainer)
        else:
            tok.train([str(f) for f in files], trainer)
        bos, eos, pad = (special + [None] * 3)[:3]
        if bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        return cls._from_backend(tok, bos, eos, pad)

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Keep the loaded config (tokenizer_class, add_bos_token, ...) so transformers loads the same way.
        cfg = dict(self._config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            cfg[key] = self.id_to_token(i) if i is not None else None
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(out / "tokenizer.json", self._tok.to_str(pretty=True))
        atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get text that is safe to show.

    Decoding one token at a time is wrong twice over: a character may span several byte
    tokens (U+FFFD until complete), and SentencePiece decoders strip the leading space of
    the first token of whatever they decode. So, as in vLLM / HF TextStreamer, we decode a
    small window ids[prefix:] and emit only what it adds beyond ids[prefix:read]: both
    decodes start at the same token, so any start-of-text effect cancels out in the diff.

    We also hold text while the window ends in a byte-fallback token: tokenizers' ByteFallback
    turns a whole run of byte tokens into U+FFFDs if the run is invalid UTF-8, so an ASCII
    byte already shown (say "<0x0A>") could be rewritten by a bad byte that follows it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        self._hidden = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix = 0  # window start: already emitted, kept only as context
        self._read = 0  # ids[:read] have been emitted

    def _pending(self) -> tuple[str, str]:
        seen = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix :], self._skip)
        return seen, full

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        seen, full = self._pending()
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for more bytes.
        if len(full) <= len(seen) or full.endswith("\ufffd") or self._ends_in_byte():
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(seen) :]

    def _ends_in_byte(self) -> bool:
        # Skipped special tokens are invisible to the decoder: byte runs join across them.
        for i in reversed(self._ids[self._read :]):
            if i not in self._hidden:
                return i in self._byte_ids
        return False

    def flush(self) -> str:
        seen, full = self._pending()
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(seen) :]
