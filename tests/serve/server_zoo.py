"""What the serving tests share: a tiny chat model folder (byte-level tokenizer with ChatML's special tokens, so the
real ChatML template renders and stops on <|im_end|>), and a real uvicorn server on a free loopback port in a thread.
Imported as `from server_zoo import ...` (a unique module name; tests/serve/conftest.py registers the fixtures)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from camelid.checkpoint import save_pretrained
from camelid.tokenizer import Tokenizer
from model_zoo import random_model, tiny_config

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
TEMPLATE = "chatml"
CONTEXT = 256  # room for a few chat turns at one token per byte


def make_chat_model(folder: Path, context: int = CONTEXT, seed: int = 0) -> Path:
    """A random tiny LLaMA + a 261-token byte-level tokenizer, saved as an HF folder."""
    tokenizer = Tokenizer.train([], 256 + len(SPECIALS), special_tokens=SPECIALS, show_progress=False)
    config = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    save_pretrained(random_model(config, seed), folder)
    tokenizer.save(folder)
    return folder


def save_parrot_model(folder: Path, tokenizer: Tokenizer, token: int, vocab_size: int | None = None,
                      context: int = 128) -> Path:
    """A one-layer tiny LLaMA that answers `token` again and again, saved to folder: every layer's output projection
    is zero (the last hidden state is the token's embedding), every embedding has a large component 0, and only
    `token`'s output row reads it. vocab_size defaults to the tokenizer's (larger: ids the tokenizer lacks)."""
    import torch

    from camelid.model import Transformer

    config = tiny_config(vocab_size=vocab_size or tokenizer.vocab_size, max_position_embeddings=context,
                         hidden_size=32, intermediate_size=32, num_hidden_layers=1, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 1.0
    save_pretrained(model, folder)
    return folder


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a port the OS picks) in a daemon thread; stop() runs the app's shutdown."""

    def __init__(self, app, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class FakeBackend:
    """A scripted Backend for the HTTP layers (app, worker, RemoteBackend) where the engine is beside the point:
    `script(prompt)` is an async generator of Chunks (it may raise BackendError, or wait forever)."""

    def __init__(self, script, name: str = "tiny", stats: dict | None = None) -> None:
        self.script, self.name, self.ok = script, name, True
        self._stats = dict(stats or {})
        self.calls = 0

    def models(self) -> list[dict]:
        return [{"id": self.name, "context_length": CONTEXT, "owned_by": "test"}]

    async def generate(self, model, prompt, messages, params, request_id):
        self.calls += 1
        async for chunk in self.script(prompt if prompt is not None else messages[-1]["content"]):
            yield chunk

    def count_chat_tokens(self, model: str, messages: list[dict]) -> int:
        return sum(len(m["content"]) for m in messages)

    def stats(self) -> dict:
        return dict(self._stats)

    def healthy(self) -> bool:
        return self.ok

    async def close(self) -> None:
        pass
