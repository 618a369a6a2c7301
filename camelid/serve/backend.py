"""What the HTTP app talks to: the Backend interface, and LocalBackend, which runs camelid.engine.LLM in-process.

The engine is not thread-safe and its step() blocks, so LocalBackend owns it from one background thread (the step
loop). Requests and aborts cross into that thread through a thread-safe queue; outputs go back to each request's
asyncio.Queue through loop.call_soon_threadsafe. The asyncio side never touches the engine, only the tokenizer
(Hugging Face tokenizers are safe to call from several threads).

A Backend is duck-typed (RemoteBackend in remote.py forwards to workers):
    models() -> [{"id", "context_length", "owned_by"}]
    async generate(model, prompt, messages, params, request_id) -> async iterator of Chunk
        raises BackendError before the first chunk for bad input; closing the iterator aborts the request
    count_chat_tokens(model, messages) -> int
    stats() -> dict of numbers (num_waiting, num_running, num_blocks, num_free_blocks, ...)
    healthy() -> bool   (optional, True when absent: False once the engine has failed, so /health answers 503)
    async close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.engine.sampling_params import SamplingParams
from camelid.monitor import Monitor
from camelid.templates import TemplateError, for_tokenizer, get_template, recorded_template

OWNER = "camelid"
DEVICE_SAMPLE_S = 1.0  # device counters are read at most this often: heartbeats and /metrics scrapes share one sample
ALIVE_CHECK_S = 1.0  # how often a request waiting to be accepted checks that the engine thread still runs

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A request the backend refuses or cannot finish; the app turns it into an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "type": self.type, "param": self.param,
                "code": self.code}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackendError:
        return cls(int(d.get("status", 500)), str(d.get("message", "backend error")), d.get("type", "server_error"),
                   d.get("param"), d.get("code"))


@dataclass
class Chunk:
    index: int  # which of the request's n completions
    text: str  # the text that is new since this index's previous chunk
    token_ids: list[int]  # the token ids that are new
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" on the index's last chunk
    prompt_tokens: int
    completion_tokens: int  # cumulative for this index
    # per new token, when the request asked for logprobs: OpenAI's chat form, {"token", "bytes", "logprob",
    # "top_logprobs": [{"token", "bytes", "logprob"}, ...]} (built here: a controller has no tokenizer)
    logprobs: list[dict] | None = None
    text_offsets: list[int] | None = None  # with logprobs: per token, the characters of the text before it
    # with params.prompt_logprobs, on the request's first chunk: per prompt token the same entry (the first token's
    # logprob and alternatives are None: nothing precedes it), and offsets into the prompt's tokens spelled out
    prompt_logprobs: list[dict] | None = None
    prompt_text_offsets: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as JSON (for RemoteBackend); SamplingParams(**d) reads it back."""
    return dataclasses.asdict(params)


class Backend:
    """The interface, spelled out (LocalBackend and RemoteBackend implement it; subclassing is optional)."""

    def models(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def generate(self, model: str, prompt: str | list[int] | None, messages: list[dict] | None,
                 params: SamplingParams, request_id: str) -> AsyncIterator[Chunk]:
        raise NotImplementedError

    def count_chat_tokens(self, model: str, messages: list[dict]) -> int:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        raise NotImplementedError

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        raise NotImplementedError


def unknown_model(model: str, known: Sequence[str]) -> BackendError:
    return BackendError(404, f"The model {model!r} does not exist; this server has: {', '.join(known)}",
                        param="model", code="model_not_found")


@dataclass
class _Route:
    """Where one request's outputs go, and what was already sent of each of its n completions."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent_text: list[str]
    sent_tokens: list[int]
    finished: list[bool]
    spelled: list[bytearray]  # with logprobs: the bytes of the tokens sent
    prompt_sent: bool = False


_DONE = object()  # the request is finished: the last item on its queue


class LocalBackend(Backend):
    """The engine in this process: one base model and its LoRA adapters, each adapter its own model name."""

    def __init__(self, llm: Any, name: str, adapters: Sequence[str] = (), template: str | None = None,
                 adapter_templates: dict[str, str | None] | None = None) -> None:
        self.llm, self.name = llm, name
        self.tokenizer = llm.tokenizer
        self.max_model_len: int = llm.max_model_len
        self.adapters = list(adapters)
        self._templates: dict[str, Any] = {}  # model name -> chat template (None: the model cannot chat)
        self._template_errors: dict[str, str] = {}
        for model in [name, *self.adapters]:
            chosen = (adapter_templates or {}).get(model) or template
            try:
                tpl = for_tokenizer(self.tokenizer) if chosen in (None, "model") else get_template(chosen)
                tpl.check(self.tokenizer)
                self._templates[model] = tpl
            except TemplateError as e:
                self._templates[model] = None
                self._template_errors[model] = str(e)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # owned by the engine thread
        self._stats: dict[str, float] = dict(llm.stats())  # refreshed by the engine thread after each step
        self._monitor = Monitor.for_device(llm.device)  # GPU utilisation / memory / power, or process CPU and RSS
        self._device: dict[str, float] = {}  # the last monitor sample, and when it was taken (under _device_lock)
        self._device_at = float("-inf")
        self._device_lock = threading.Lock()
        self._failure: BaseException | None = None
        # _closed flips under _accepting, and an add is queued under it too: once _stop has set it and drained the
        # queue, no add can arrive that nobody answers
        self._closed = False
        self._accepting = threading.Lock()
        self._batch: list[tuple] = []  # the commands the engine thread took and has not handled yet
        self._thread = threading.Thread(target=self._loop, name="camelid-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model_dir: str | Path, adapters: dict[str, str] | None = None, name: str | None = None,
             template: str | None = None, **llm_kwargs: Any) -> LocalBackend:
        """Build the engine over a model folder (+ PEFT adapter folders by name) and serve it."""
        from camelid.engine import LLM

        adapters = dict(adapters or {})
        name = name or Path(model_dir).resolve().name
        if name in adapters:
            raise ValueError(f"adapter name {name!r} is also the base model's name: pick another")
        llm = LLM(str(model_dir), adapters=adapters or None, **llm_kwargs)
        # no --template: the one `camelid finetune` recorded in a full fine-tune's (or merged) model folder
        template = template or recorded_template(model_dir)
        recorded = {a: recorded_template(folder) for a, folder in adapters.items()}
        return cls(llm, name, list(adapters), template, recorded)

    # ---- the Backend interface ------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [{"id": m, "context_length": self.max_model_len, "owned_by": OWNER} for m in [self.name, *self.adapters]]

    def _check_model(self, model: str) -> None:
        if model != self.name and model not in self.adapters:
            raise unknown_model(model, [self.name, *self.adapters])

    def _template(self, model: str):
        tpl = self._templates.get(model)
        if tpl is None:
            raise BackendError(400, f"model {model!r} has no chat template ({self._template_errors.get(model)}); "
                               "use /v1/completions or start the server with --template NAME", param="messages")
        return tpl

    def chat_ids(self, model: str, messages: list[dict]) -> list[int]:
        self._check_model(model)
        try:
            return self._template(model).encode_prompt(self.tokenizer, messages)
        except TemplateError as e:
            raise BackendError(400, str(e), param="messages") from None

    def count_chat_tokens(self, model: str, messages: list[dict]) -> int:
        return len(self.chat_ids(model, messages))

    def _prepare(self, model: str, prompt: str | list[int] | None, messages: list[dict] | None,
                 params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """Token ids and the final sampling params (chat adds the template's stops), or BackendError."""
        self._check_model(model)
        if (prompt is None) == (messages is None):
            raise BackendError(400, "give exactly one of prompt and messages", param="prompt")
        if params.logprobs is not None and self.tokenizer is None:  # it spells each token (_token)
            raise BackendError(400, "logprobs need a tokenizer (the model folder has no tokenizer.json)",
                               param="logprobs")
        param = "messages" if messages is not None else "prompt"
        if messages is not None:
            tpl = self._template(model)
            ids = self.chat_ids(model, messages)
            _, eos = tpl.special_tokens(self.tokenizer)
            stop_ids = tpl.stop_token_ids(self.tokenizer)
            stop_ids_set = set(stop_ids)
            # a stop string that is one special token is already a stop id; the others stop on text ("USER:")
            strings = [s.replace("{eos}", eos) for s in tpl.stop_strings]
            strings = [s for s in strings if s and self.tokenizer.token_to_id(s) not in stop_ids_set]
            params = dataclasses.replace(params, stop_token_ids=sorted({*params.stop_token_ids, *stop_ids}),
                                         stop=list(dict.fromkeys([*params.stop, *strings])))
        elif isinstance(prompt, str):
            if not prompt:
                raise BackendError(400, "prompt is empty", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.llm.config.vocab_size
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise BackendError(400, f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})",
                                   param="prompt")
        if not ids:
            raise BackendError(400, f"{param} is empty", param=param)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise BackendError(400, f"This model's maximum context length is {limit} tokens; the {param} "
                               f"{'have' if param == 'messages' else 'has'} {len(ids)} tokens, which leaves no room for an answer", param=param,
                               code="context_length_exceeded")
        if len(ids) + params.max_tokens > limit:
            raise BackendError(400, f"This model's maximum context length is {limit} tokens; you requested "
                               f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the {param}, "
                               f"{params.max_tokens} for max_tokens). Reduce the length of the {param} or "
                               "max_tokens", param="max_tokens", code="context_length_exceeded")
        return ids, params

    async def generate(self, model: str, prompt: str | list[int] | None, messages: list[dict] | None,
                       params: SamplingParams, request_id: str) -> AsyncIterator[Chunk]:
        # tokenizing (or rendering a chat of) up to a 1 MiB body takes milliseconds: not on the event loop
        ids, params = await asyncio.to_thread(self._prepare, model, prompt, messages, params)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        out: asyncio.Queue = asyncio.Queue()
        adapter = None if model == self.name else model
        route = _Route(loop, out, [""] * params.n, [0] * params.n, [False] * params.n,
                       [bytearray() for _ in range(params.n)])
        with self._accepting:
            self._check_running()
            self._commands.put(("add", request_id, ids, params, adapter, route, accepted))
        finished = False
        try:
            error = await self._accepted(accepted)
            if isinstance(error, BackendError):
                raise error
            if error is not None:
                raise BackendError(400, error, param=_param_of(error, "prompt" if messages is None else "messages"))
            while True:
                items = [await out.get()]
                while not out.empty():  # a consumer that fell behind takes what piled up as fewer, bigger chunks
                    items.append(out.get_nowait())
                for item in _coalesce(items):
                    if item is _DONE:
                        finished = True
                        return
                    if isinstance(item, BaseException):
                        finished = True
                        raise BackendError(500, f"the engine failed: {item}", type="server_error")
                    yield item
        finally:
            if not finished:  # the client went away (or the caller closed us early): free the KV blocks now
                self._commands.put(("abort", request_id))

    async def _accepted(self, accepted: asyncio.Future) -> Any:
        """The engine's answer to an add. A backstop against a hang: an engine thread that is gone answers 503."""
        while not (await asyncio.wait({accepted}, timeout=ALIVE_CHECK_S))[0]:
            if not self._thread.is_alive():
                await asyncio.wait({accepted}, timeout=0.1)  # an answer it sent just before exiting is on its way
                if not accepted.done():
                    self._check_running()
                    raise BackendError(503, "the engine thread is gone", type="server_error")
        return accepted.result()

    def stats(self) -> dict[str, float]:
        # Monitor.sample() measures CPU use since its previous call: sampled at most once a second and shared, so
        # heartbeats and /metrics scrapes do not shorten each other's window (and NVML is not queried per call)
        with self._device_lock:
            now = time.monotonic()
            if now - self._device_at >= DEVICE_SAMPLE_S:
                self._device = {f"device_{k}": v for k, v in self._monitor.sample().items() if v is not None}
                self._device_at = now
            device = self._device
        return {**self._stats, **device}

    def healthy(self) -> bool:
        """False once the engine has failed (every request would get 503): /health says so, a worker leaves."""
        return self._failure is None and (self._closed or self._thread.is_alive())

    def _check_running(self) -> None:
        if self._failure is not None:
            raise BackendError(503, f"the engine stopped after an error: {self._failure}", type="server_error")
        if self._closed:
            raise BackendError(503, "the server is shutting down", type="server_error")

    async def close(self) -> None:
        with self._accepting:
            self._closed = True
            self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, 30)

    # ---- the engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Serve until a stop command or an error; then end every request, so nothing waits forever."""
        try:
            self._serve()
            error: BaseException = RuntimeError("the server is shutting down")
        except Exception as e:  # noqa: BLE001 - an engine bug must end the requests and mark us unhealthy, not hang
            log.exception("the engine failed; this backend refuses every request from now on")
            self._failure = error = e
        self._stop(error)

    def _serve(self) -> None:
        while True:
            idle = not self.llm.has_unfinished()
            try:
                self._batch = [self._commands.get() if idle else self._commands.get_nowait()]
            except queue.Empty:
                self._batch = []
            while True:  # take every command that is waiting, so a burst of requests joins one step
                try:
                    self._batch.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            while self._batch:
                cmd = self._batch.pop(0)
                if cmd[0] == "stop":
                    return  # _stop answers the rest of the batch
                if cmd[0] == "add":
                    self._add(*cmd[1:])
                elif cmd[0] == "abort" and cmd[1] in self._routes:
                    self._routes.pop(cmd[1])
                    self.llm.abort(cmd[1])
            if self.llm.has_unfinished():
                outputs = self.llm.step()
                self._stats = dict(self.llm.stats())  # before the outputs go out: a client never sees older stats
                for output in outputs:
                    try:
                        self._dispatch(output)
                    except Exception as e:  # noqa: BLE001 - turning one output into chunks failed: end that request
                        log.exception("request %s failed while its output was sent", output.request_id)
                        route = self._routes.pop(output.request_id, None)
                        self.llm.abort(output.request_id)
                        if route is not None:
                            _send(route, e)
            else:
                self._stats = dict(self.llm.stats())

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, adapter: str | None, route: _Route,
             accepted: asyncio.Future) -> None:
        try:
            self.llm.add_request(ids, params, adapter=adapter, request_id=request_id)
        except ValueError as e:
            _call_in(route, _resolve, accepted, str(e))
            return
        except Exception as e:  # noqa: BLE001 - refuse this request, keep serving the others
            _call_in(route, _resolve, accepted, BackendError(500, f"the engine failed: {e}", type="server_error"))
            return
        if _call_in(route, _resolve, accepted, None):
            self._routes[request_id] = route
        else:  # nobody is listening any more
            self.llm.abort(request_id)

    def _dispatch(self, output: Any) -> None:
        route = self._routes.get(output.request_id)
        if route is None:  # aborted meanwhile
            return
        for c in output.outputs:
            i = c.index
            if route.finished[i]:
                continue
            text = c.text
            # the engine holds back text that may still become a stop string; what it shows only grows
            new_text = text[len(route.sent_text[i]):] if text.startswith(route.sent_text[i]) else ""
            new_ids = list(c.token_ids[route.sent_tokens[i]:])
            if not new_text and not new_ids and c.finish_reason is None:
                continue
            logprobs = offsets = None
            if c.logprobs is not None:
                logprobs = [self._logprob_entry(e) for e in c.logprobs[route.sent_tokens[i]:len(c.token_ids)]]
                offsets = self._text_offsets(route.spelled[i], logprobs)
            route.sent_text[i] += new_text
            route.sent_tokens[i] = len(c.token_ids)
            route.finished[i] = c.finish_reason is not None
            chunk = Chunk(i, new_text, new_ids, c.finish_reason, len(output.prompt_token_ids), len(c.token_ids),
                          logprobs, offsets)
            if output.prompt_logprobs is not None and not route.prompt_sent:  # complete once a token is out
                route.prompt_sent = True
                first = output.prompt_token_ids[0]
                chunk.prompt_logprobs = [{**self._token(first, 0.0), "logprob": None, "top_logprobs": None}] + [
                    self._logprob_entry(e) for e in output.prompt_logprobs[1:]]
                chunk.prompt_text_offsets = self._text_offsets(bytearray(), chunk.prompt_logprobs)
            if not _send(route, chunk):  # its event loop is gone (the abort is still on its way): free it now
                self._routes.pop(output.request_id, None)
                self.llm.abort(output.request_id)
                return
        if output.finished:
            self._routes.pop(output.request_id, None)
            _send(route, _DONE)

    def _token(self, token_id: int, logprob: float) -> dict:
        # an id of the model's vocabulary padded past the tokenizer's: it decodes to nothing
        raw = self.tokenizer.token_bytes(token_id) if token_id < self.tokenizer.vocab_size else b""
        try:
            token = raw.decode()
        except UnicodeDecodeError:  # part of a character: OpenAI's spelling, distinct per byte sequence
            token = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        # JSON has no -inf: OpenAI writes -9999.0 for a token the model rules out
        return {"token": token, "bytes": list(raw), "logprob": max(logprob, -9999.0)}

    def _logprob_entry(self, entry: dict) -> dict:
        """The engine's {"token_id", "logprob", "top": {id: logprob}} as OpenAI's chat logprobs entry."""
        return {**self._token(entry["token_id"], entry["logprob"]),
                "top_logprobs": [self._token(t, lp) for t, lp in entry["top"].items()]}

    def _text_offsets(self, spelled: bytearray, entries: list[dict]) -> list[int]:
        """Per entry, the characters of the completion's text before its token (the legacy text_offset); `spelled`
        holds the bytes of the earlier tokens and grows by these. The text lacks a leading space that the decoder
        drops (SentencePiece: "▁Paris" alone is "Paris")."""
        offsets = []
        for e in entries:
            before = spelled.decode("utf-8", errors="replace")  # as the text shows bytes that are no UTF-8
            offsets.append(len(before) - (before.startswith(" ") and self.tokenizer.drops_leading_space))
            spelled += bytes(e["bytes"])
        return offsets

    def _stop(self, error: BaseException) -> None:
        """End every request with error, and refuse every add not yet handled (taken in the last batch, or still
        queued); the thread then exits."""
        with self._accepting:  # from here on no add is queued: the drain below sees every one
            self._closed = True
        for route in self._routes.values():
            _send(route, error)
        self._routes.clear()
        refusal = BackendError(503, f"the engine stopped: {error}", type="server_error")
        while True:
            try:
                self._batch.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in self._batch:
            if cmd[0] == "add":
                _call_in(cmd[5], _resolve, cmd[6], refusal)
        self._batch = []


def _coalesce(items: list) -> list:
    """Merge runs of chunks of the same completion index into one (text and ids joined, the last counts kept)."""
    merged: list = []
    for item in items:
        last = merged[-1] if merged else None
        if isinstance(item, Chunk) and isinstance(last, Chunk) and last.index == item.index \
                and last.finish_reason is None:
            logprobs = None if item.logprobs is None else (last.logprobs or []) + item.logprobs
            offsets = None if item.text_offsets is None else (last.text_offsets or []) + item.text_offsets
            merged[-1] = Chunk(item.index, last.text + item.text, last.token_ids + item.token_ids,
                               item.finish_reason, item.prompt_tokens, item.completion_tokens, logprobs, offsets,
                               last.prompt_logprobs or item.prompt_logprobs,
                               last.prompt_text_offsets or item.prompt_text_offsets)
        else:
            merged.append(item)
    return merged


def _call_in(route: _Route, fn, *args) -> bool:
    """Run fn(*args) on the request's event loop; False when that loop has closed."""
    try:
        route.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _send(route: _Route, item: Any) -> bool:
    return _call_in(route, route.queue.put_nowait, item)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _param_of(message: str, default: str) -> str:
    """The request field an engine ValueError names ("temperature must be ..."), else default."""
    first = message.split(" ", 1)[0].strip(":,")
    return first if first.isidentifier() and first in {f.name for f in dataclasses.fields(SamplingParams)} \
        else default
