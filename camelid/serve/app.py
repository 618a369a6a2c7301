"""The OpenAI-compatible HTTP API over a Backend: completions, chat completions (SSE streaming), models, chat
sessions, health, Prometheus metrics, and the web chat page.

Bad input never reaches the engine and never gives a 500: pydantic checks types and ranges, the backend checks
models and lengths before its first chunk, and every error leaves as OpenAI's body
{"error": {"message", "type", "param", "code"}} with a 4xx status. A streamed response first waits for the
backend's first chunk, so a refused request still gets a real status code instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from camelid.engine.sampling_params import SamplingParams
from camelid.serve.backend import BackendError, Chunk, unknown_model
from camelid.serve.errors import MAX_BODY_BYTES, BodyLimit, add_error_handlers, error_body
from camelid.serve.metrics import CountRequests, Metrics
from camelid.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ErrorResponse, ModelCard, ModelList, Session, SessionCreate,
                                    SessionDeleted, SessionList, SessionUpdate, SessionWithMessages)
from camelid.serve.sessions import DEFAULT_TITLE, SessionStore

WEB_DIR = Path(__file__).parent / "web"
REVALIDATE = {"Cache-Control": "no-cache"}  # the web page's files (see _RevalidatedFiles)
ANONYMOUS = "anonymous"
TITLE_CHARS = 60  # a new session is titled with the start of its first message
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def _completion_logprobs(entries: list[dict] | None, offsets: list[int] | None) -> dict | None:
    """/v1/completions' (legacy) logprobs of some tokens; a text_offset counts the characters before its token (the
    backend counts them: it knows what its tokenizer's decoder does to the text)."""
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


# ---- the app -------------------------------------------------------------------------------------------------------

async def _call(fn, *args):
    """Await an async backend method; run a blocking one (RemoteBackend asks the controller) in a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await run_in_threadpool(fn, *args)
    return await result if inspect.isawaitable(result) else result


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _user_id(key: str) -> str:
    """Sessions are stored under a hash of the API key, so the database never holds the keys themselves."""
    return "key-" + _digest(key)[:24]


def _sampling(body, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None,
              n: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(n=n or body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              stop=body.stop_list(), seed=body.seed, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, logit_bias=body.logit_bias)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise BackendError(400, str(e), param=param if param.isidentifier() else None) from None


def _refuse_unsupported(body) -> None:
    found = body.unsupported()
    if found is not None:
        name, feature = found
        raise BackendError(400, f"{name}: this server does not support {feature}", param=name,
                           code="unsupported_parameter")


def create_app(backend, api_keys: list[str] | None = None, sessions: SessionStore | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over backend (LocalBackend or RemoteBackend). api_keys: None or [] = open, one anonymous
    user; sessions: None = the sessions API answers 404. Closing the app (lifespan end) closes the backend."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()
        if sessions is not None:
            await run_in_threadpool(sessions.close)

    app = FastAPI(title="camelid", description="OpenAI-compatible API over the camelid engine, with chat sessions.",
                  version="0.1.0", lifespan=lifespan)
    metrics = Metrics()
    app.state.backend, app.state.sessions, app.state.metrics = backend, sessions, metrics
    keys = {_digest(k): _user_id(k) for k in (api_keys or [])}  # looked up by digest: no timing leak of the keys

    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # added last = outermost: it also counts the 413s

    def user(request: Request) -> str:
        if not keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        user_id = keys.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if user_id is None:
            raise BackendError(401, "missing API key: send Authorization: Bearer KEY" if not header else
                               "incorrect API key", type="authentication_error", code="invalid_api_key")
        return user_id

    async def model_ids() -> list[dict]:
        return await _call(backend.models)

    async def model_card(model: str) -> dict:
        cards = await model_ids()
        if not cards:  # a cluster whose workers are all gone (restarting): out of capacity, not an unknown model
            raise BackendError(503, "this server has no live worker right now: retry shortly", type="server_error",
                               code="no_live_worker")
        card = next((c for c in cards if c["id"] == model), None)
        if card is None:
            raise unknown_model(model, [c["id"] for c in cards])
        return card

    async def context_length(model: str) -> int:
        return int((await model_card(model))["context_length"])

    def store() -> SessionStore:
        if sessions is None:
            raise BackendError(404, "chat sessions are not enabled on this server (start it with --db)",
                               param="session_id")
        return sessions

    async def find_session(user_id: str, session_id: str) -> dict:
        found = await run_in_threadpool(store().get, user_id, session_id)
        if found is None:
            raise BackendError(404, f"no session {session_id!r}", type="not_found_error", param="session_id")
        return found

    # ---- generation ------------------------------------------------------------------------------------------------

    async def start(model: str, prompt, messages, params: SamplingParams, request_id: str):
        """(first chunk or None, the iterator): BackendError surfaces here, before any byte is sent."""
        chunks = backend.generate(model, prompt, messages, params, request_id)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        return first, chunks

    async def rest(first: Chunk | None, chunks) -> AsyncIterator[Chunk]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    async def gather(first, chunks, texts: list[str], reasons: list[str | None]) -> tuple:
        """The whole answer, filled into texts/reasons as it comes (a caller that gives up still sees the part);
        then the prompt and completion token counts, each choice's logprobs with their text offsets (None unless
        asked for) and the prompt's (with echo)."""
        tokens, prompt_tokens = [0] * len(texts), 0
        logprobs: list[tuple[list[dict], list[int]] | None] = [None] * len(texts)
        prompt_logprobs = None
        async with contextlib.aclosing(chunks):
            async for c in rest(first, chunks):
                texts[c.index] += c.text
                reasons[c.index] = c.finish_reason or reasons[c.index]
                tokens[c.index] = c.completion_tokens
                prompt_tokens = c.prompt_tokens
                if c.logprobs is not None:
                    entries, offsets = logprobs[c.index] or ([], [])
                    logprobs[c.index] = (entries + c.logprobs, offsets + (c.text_offsets or []))
                if c.prompt_logprobs is not None:
                    prompt_logprobs = (c.prompt_logprobs, c.prompt_text_offsets)
        metrics.prompt_tokens += prompt_tokens
        metrics.generation_tokens += sum(tokens)
        return texts, reasons, prompt_tokens, sum(tokens), logprobs, prompt_logprobs

    async def collect(request: Request, first, chunks, n: int, on_end=None) -> tuple:
        """The whole answer; a client that hangs up meanwhile (a timeout) aborts the request in the engine, as
        for a stream (nothing cancels a plain request's handler for us). on_end(texts, reasons) runs however it
        ends, as for a stream: reasons are "error" where the backend failed."""
        texts, reasons = [""] * n, [None] * n
        task = asyncio.ensure_future(gather(first, chunks, texts, reasons))
        metrics.in_flight += 1
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    try:
                        return task.result()
                    except BackendError:
                        reasons[:] = [r or "error" for r in reasons]
                        raise
                if await request.is_disconnected():
                    task.cancel()  # closes the backend's iterator: the engine frees the request's blocks
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise BackendError(499, "the client closed the connection", code="client_closed_request")
        finally:
            metrics.in_flight -= 1
            if not task.done():  # this handler itself was cancelled (server shutdown)
                task.cancel()
            if on_end is not None:
                with anyio.CancelScope(shield=True):
                    await on_end(texts, reasons)

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def stream_events(first, chunks, n: int, make_choice, envelope: dict, include_usage: bool,
                            on_end=None) -> AsyncIterator[str]:
        """SSE events from the chunks; on_end(texts, reasons) runs however the stream ends (client gone too)."""
        texts, reasons, tokens, prompt_tokens = [""] * n, [None] * n, [0] * n, 0
        metrics.in_flight += 1
        try:
            async with contextlib.aclosing(chunks):
                for prelude in make_choice(None):
                    yield sse({**envelope, "choices": [prelude]})
                async for c in rest(first, chunks):
                    texts[c.index] += c.text
                    reasons[c.index] = c.finish_reason or reasons[c.index]
                    metrics.generation_tokens += c.completion_tokens - tokens[c.index]
                    tokens[c.index] = c.completion_tokens
                    if not prompt_tokens:
                        prompt_tokens = c.prompt_tokens
                        metrics.prompt_tokens += prompt_tokens
                    for choice in make_choice(c):
                        yield sse({**envelope, "choices": [choice]})
            if on_end is not None:  # [DONE] acknowledges the turn: it is stored first, or the stream says it is not
                end, on_end = on_end, None
                try:
                    with anyio.CancelScope(shield=True):
                        await end(texts, reasons)
                except Exception as e:
                    yield sse(error_body(f"the answer could not be stored in the session: {type(e).__name__}: {e}",
                                         "server_error"))
                    yield "data: [DONE]\n\n"
                    return
            if include_usage:
                yield sse({**envelope, "choices": [], "usage": usage(prompt_tokens, sum(tokens))})
            yield "data: [DONE]\n\n"
        except BackendError as e:  # failed mid-stream (a worker died): say so in the stream, then end it
            reasons[:] = [r or "error" for r in reasons]
            yield sse(error_body(e.message, e.type, e.param, e.code))
            yield "data: [DONE]\n\n"
        finally:
            metrics.in_flight -= 1
            if on_end is not None:
                with anyio.CancelScope(shield=True):  # the client may be gone: still store what was produced
                    await on_end(texts, reasons)

    # ---- endpoints -------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        # a backend whose engine failed refuses every request: a load balancer must stop sending it traffic
        if not getattr(backend, "healthy", lambda: True)():
            return JSONResponse(error_body("the engine has failed: this server refuses every request",
                                           "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        stats = await _call(backend.stats)
        return PlainTextResponse(metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(user_id: str = Depends(user)) -> dict:
        return {"object": "list", "data": [{"object": "model", "created": 0, **c} for c in await model_ids()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def retrieve_model(model_id: str, user_id: str = Depends(user)) -> dict:
        return {"object": "model", "created": 0, **await model_card(model_id)}

    # documented, not enforced: a stream answers text/event-stream instead
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413)}

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **errors})
    async def completions(body: CompletionRequest, request: Request, user_id: str = Depends(user)):
        _refuse_unsupported(body)
        ctx = await context_length(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise BackendError(400, f"send one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise BackendError(400, "prompt is empty", param="prompt")
        max_tokens = body.max_tokens or 16
        if max_tokens >= ctx:
            raise BackendError(400, f"max_tokens is {max_tokens}, but the model's context is {ctx} tokens",
                               param="max_tokens")
        # echo scores the prompt when logprobs are asked for (a text's likelihood, as lm-eval asks), and spells
        # a prompt of token ids from its tokens (the server may have no tokenizer: a controller)
        scores_prompt = body.echo and (body.logprobs is not None or not isinstance(prompt, str))
        # best_of: generate that many candidates and return the n with the highest cumulative logprob (OpenAI's
        # and vLLM's rule), so every candidate's token logprobs are needed, asked for or not
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise BackendError(400, f"best_of ({best_of}) must be at least n ({body.n})", param="best_of")
        if best_of > body.n and body.stream:
            raise BackendError(400, "best_of cannot be used with stream: the best candidates are known only at "
                               "the end", param="best_of")
        logprobs = body.logprobs if best_of == body.n else body.logprobs or 0
        params = _sampling(body, max_tokens, logprobs, (body.logprobs or 0) if scores_prompt else None, best_of)
        rid = f"cmpl-{uuid.uuid4().hex}"
        first, chunks = await start(body.model, prompt, None, params, rid)
        envelope = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model}

        def with_echo(text: str, entries: list[dict] | None, offsets: list[int] | None, scored) -> tuple:
            """A choice's first text, logprobs and offsets, after the echoed prompt (scored: its entries and
            offsets, or None). The prompt's offsets count its tokens spelled out."""
            entries_before, offsets_before = scored or ([], [])
            head = prompt if isinstance(prompt, str) else b"".join(
                bytes(e["bytes"]) for e in entries_before).decode("utf-8", errors="replace")
            if entries is None:
                return head + text, None, None
            return head + text, entries_before + entries, offsets_before + [len(head) + o for o in offsets or []]

        if body.stream:
            echo_length = [None] * body.n  # per choice with echo: the echoed prompt's length, once sent
            scored = None

            def choice(c: Chunk | None):
                nonlocal scored
                if c is None:
                    return []
                scored = scored or (c.prompt_logprobs and (c.prompt_logprobs, c.prompt_text_offsets))
                text, entries, offsets = c.text, c.logprobs, c.text_offsets
                if body.echo and echo_length[c.index] is None:
                    text, entries, offsets = with_echo(text, entries, offsets, scored)
                    echo_length[c.index] = len(text) - len(c.text)
                elif not text and c.finish_reason is None and not entries:
                    return []
                elif body.echo and offsets is not None:
                    offsets = [echo_length[c.index] + o for o in offsets]
                logprobs = _completion_logprobs(entries, offsets)
                return [{"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs}]
            include = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(stream_events(first, chunks, body.n, choice, envelope, include))
        texts, reasons, p, c, logprobs, scored = await collect(request, first, chunks, best_of)
        best = sorted(range(best_of), key=lambda i: -sum(e["logprob"] for e in (logprobs[i] or ([], []))[0])) \
            if best_of > body.n else range(body.n)
        choices = []
        for i, j in enumerate(best[:body.n]):  # usage still counts the tokens of every candidate
            text, reason, lp = texts[j], reasons[j], logprobs[j] if body.logprobs is not None else None
            entries, offsets = lp or (None, None)
            if body.echo:
                text, entries, offsets = with_echo(text, entries, offsets, scored)
            choices.append({"index": i, "text": text, "finish_reason": reason,
                            "logprobs": _completion_logprobs(entries, offsets)})
        return {**envelope, "choices": choices, "usage": usage(p, c)}

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request, user_id: str = Depends(user)):
        _refuse_unsupported(body)
        ctx = await context_length(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise BackendError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens >= ctx:
            name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"  # the one the client sent
            raise BackendError(400, f"{name} is {max_tokens}, but the model's context is {ctx} tokens", param=name)
        session, new_turns = None, messages
        if body.session_id is not None:
            session = await find_session(user_id, body.session_id)
            messages = await with_history(body.model, session, messages, ctx, max_tokens)
        if max_tokens is None:  # as much as the context leaves
            max_tokens = ctx - await _call(backend.count_chat_tokens, body.model, messages)
            if max_tokens < 1:
                raise BackendError(400, f"the messages fill the model's whole context of {ctx} tokens",
                                   param="messages", code="context_length_exceeded")
        params = _sampling(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        first, chunks = await start(body.model, None, messages, params, rid)
        envelope = {"id": rid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                    "created": int(time.time()), "model": body.model}
        if session is not None:
            envelope["session_id"] = session["id"]

        async def save(texts: list[str], reasons) -> None:
            # streamed or not, the same rule: a finished answer is stored, and so is the part a client stopped
            # (the web page's Stop button, a timeout: the user saw it); one the server failed ("error") is not
            if session is not None and reasons[0] != "error":
                await run_in_threadpool(record_turn, user_id, session, new_turns, texts[0])

        if body.stream:
            def choice(c: Chunk | None):
                if c is None:  # the opening delta of each choice names the role
                    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None} for i in range(body.n)]
                if not c.text and c.finish_reason is None and not c.logprobs:  # no text yet (a split character)
                    return []
                delta = {"content": c.text} if c.text else {}
                logprobs = None if c.logprobs is None else {"content": c.logprobs}
                return [{"index": c.index, "delta": delta, "finish_reason": c.finish_reason, "logprobs": logprobs}]
            include = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(stream_events(first, chunks, body.n, choice, envelope, include, save))
        texts, reasons, p, c, logprobs, _ = await collect(request, first, chunks, body.n, save)
        return {**envelope, "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                                         "finish_reason": r, "logprobs": None if lp is None else {"content": lp[0]}}
                                        for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))],
                "usage": usage(p, c)}

    async def with_history(model: str, session: dict, new: list[dict], ctx: int, max_tokens: int | None) -> list[dict]:
        """System prompt + stored turns + the new messages, dropping whole turns from the oldest until the prompt
        leaves room for the answer (max_tokens, or a quarter of the context when not given). A system message sent
        with the turn replaces the session's, and goes first: templates take a system message only there."""
        system = [m for m in new if m["role"] == "system"] or (
            [{"role": "system", "content": session["system_prompt"]}] if session.get("system_prompt") else [])
        new = [m for m in new if m["role"] != "system"]
        history = [{"role": m["role"], "content": m["content"]} for m in session["messages"]]
        budget = ctx - (max_tokens if max_tokens is not None else max(1, ctx // 4))
        # where the kept history may start: everything, then after each dropped turn (a turn starts with its user
        # message), then nothing
        cuts = [0] + [i for i, m in enumerate(history) if i > 0 and m["role"] == "user"] + [len(history)]

        async def fits(k: int) -> bool:  # the history from cut k on leaves room for the answer (one count)
            return await _call(backend.count_chat_tokens, model, system + history[cuts[k]:] + new) <= budget

        # the first cut that fits; the empty history is taken uncounted (then the new messages alone are too long,
        # which is not the history's to fix). A template renders one message after another, so dropping whole
        # turns never adds tokens and "fits" only turns on along the cuts: a binary search finds the first with
        # O(log turns) counts (each a whole render + tokenize), after one count for the usual "all fits"
        if not history or await fits(0):
            return system + history + new
        lo, hi = 1, len(cuts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if await fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return system + history[cuts[lo]:] + new

    def record_turn(user_id: str, session: dict, new_turns: list[dict], answer: str) -> None:
        turns = [m for m in new_turns if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
        sessions.append(user_id, session["id"], turns)
        first_user = next((m["content"] for m in new_turns if m["role"] == "user"), "")
        if session["title"] == DEFAULT_TITLE and not session["messages"] and first_user.strip():
            sessions.update(user_id, session["id"], title=first_user.strip()[:TITLE_CHARS])

    # ---- sessions --------------------------------------------------------------------------------------------------

    @app.post("/v1/sessions", response_model=Session)
    async def create_session(body: SessionCreate, user_id: str = Depends(user)) -> dict:
        if body.model is not None:
            await context_length(body.model)  # 404 for an unknown model
        return await run_in_threadpool(store().create, user_id, body.title, body.model, body.system_prompt)

    @app.get("/v1/sessions", response_model=SessionList)
    async def list_sessions(user_id: str = Depends(user)) -> dict:
        return {"object": "list", "data": await run_in_threadpool(store().list, user_id)}

    @app.get("/v1/sessions/{session_id}", response_model=SessionWithMessages)
    async def get_session(session_id: str, user_id: str = Depends(user)) -> dict:
        return await find_session(user_id, session_id)

    @app.patch("/v1/sessions/{session_id}", response_model=Session)
    async def update_session(session_id: str, body: SessionUpdate, user_id: str = Depends(user)) -> dict:
        if body.model is not None:
            await context_length(body.model)
        found = await run_in_threadpool(store().update, user_id, session_id, title=body.title, model=body.model,
                                        system_prompt=body.system_prompt)
        if found is None:
            raise BackendError(404, f"no session {session_id!r}", type="not_found_error", param="session_id")
        return found

    @app.delete("/v1/sessions/{session_id}", response_model=SessionDeleted)
    async def delete_session(session_id: str, user_id: str = Depends(user)) -> dict:
        if not await run_in_threadpool(store().delete, user_id, session_id):
            raise BackendError(404, f"no session {session_id!r}", type="not_found_error", param="session_id")
        return {"id": session_id, "deleted": True}

    # ---- the web chat page -----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        page = WEB_DIR / "index.html"
        if not page.is_file():
            raise BackendError(404, "the web chat page is not installed", type="not_found_error")
        return FileResponse(page, headers=REVALIDATE)

    app.mount("/static", _RevalidatedFiles(directory=WEB_DIR, check_dir=False), name="static")
    return app


class _RevalidatedFiles(StaticFiles):
    """The page's files, which the browser must revalidate (304 while unchanged) instead of caching them by heuristic:
    else, even on reload, it ran the old app.js against an upgraded server for days."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(REVALIDATE)
        return response


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

