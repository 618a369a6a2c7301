"""LLM: the engine's front door. Requests in, RequestOutputs out; one `step` is one batched forward.

    llm = LLM("path/to/model", kv_cache_memory="2GB")
    outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))

The step is the whole engine in three lines (`_step_tokens`): the scheduler picks the work, the runner computes it and
samples, the scheduler appends the tokens and ends sequences at a stop token or a length limit. This file then turns
token ids into text (StreamDecoder for clean UTF-8, StopStrings for stop strings) and RequestOutputs.

Not thread-safe: one thread drives add_request / step / abort (a server runs them on one engine loop).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from camelid.checkpoint import from_pretrained, parse_dtype, parse_size
from camelid.config import ModelConfig
from camelid.engine.block_manager import BlockManager
from camelid.engine.multi_lora import MultiLoRA
from camelid.engine.paged_attention import PagedKVCache
from camelid.engine.runner import Runner
from camelid.engine.sampling_params import SamplingParams
from camelid.engine.scheduler import Scheduler
from camelid.engine.sequence import Sequence
from camelid.generate import StopStrings, activation_dtype
from camelid.model import Transformer, stack_projections
from camelid.monitor import kv_cache_bytes, weight_bytes
from camelid.tokenizer import StreamDecoder, Tokenizer

CPU_KV_CACHE_BYTES = 2**30  # default KV budget on CPU (GPU: 90% of the memory left after the weights)


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative; a stop string and anything after it are excluded
    token_ids: list[int]  # cumulative; a stop token that ended the sequence is included
    finish_reason: str | None = None  # None while running, then "stop" | "length" | "abort"
    logprobs: list[dict] | None = None  # per token {"token_id", "logprob", "top": {id: logprob}} when asked for


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # per prompt token when asked for (SamplingParams.prompt_logprobs): None for the first, then entries as in
    # CompletionOutput.logprobs; complete once the prompt has been computed
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class _Completion:
    """Text state of one sequence: what has been turned into text so far."""

    seq: Sequence
    decoder: StreamDecoder | None
    stopper: StopStrings
    text: str = ""
    num_decoded: int = 0  # output tokens already pushed through the decoder


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[_Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.seq.is_finished for c in self.completions)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(c.seq.index, c.text, c.seq.output_token_ids, c.seq.finish_reason,
                                 list(c.seq.logprobs) if c.seq.logprobs is not None else None)
                for c in self.completions]
        scored = self.completions[0].seq.prompt_logprobs
        return RequestOutput(self.request_id, self.prompt_token_ids, outs, self.finished,
                             list(scored) if scored is not None else None)


class LLM:
    def __init__(self, model: str | Path | Transformer, adapters: dict[str, str | Path] | None = None,
                 kv_cache_memory: int | str | None = None, num_blocks: int | None = None, block_size: int = 16,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 tokenizer: Tokenizer | None = None, max_adapters: int = 8, cuda_graphs: bool | None = None,
                 compile: bool = False, decode_steps: int = 1):
        """`model`: a HF-style folder (its tokenizer.json, when present, becomes `llm.tokenizer`), or a Transformer.
        The KV cache gets `num_blocks` blocks of `block_size` tokens, or as many as fit in `kv_cache_memory` bytes
        ("4GB" works); by default 90% of the free GPU memory, or on CPU 1 GiB at most (never more than max_num_seqs
        full-length sequences need). A sequence never outgrows `llm.max_model_len`: the model's context, or the
        whole cache when that is smaller. `max_num_batched_tokens` is the token budget of one step.
        `cuda_graphs`: decode steps replay CUDA graphs (camelid/engine/cuda_graphs.py); by default on CUDA. True on
        CPU runs their padded static-buffer path without a graph (a check of that path, not a speed-up).
        `compile`: torch.compile the decode forward the graphs replay (fused elementwise kernels: fewer, faster
        launches per step; costs minutes at start: 171 s with 20 captures on an H100). A compile or capture that
        fails leaves plain graphs.
        `decode_steps` K > 1: a step whose batch is all decodes on the graphs runs K decode steps back to back,
        sampling on the device and syncing once (the host's per-step work, scheduling and bookkeeping, no longer
        sits between the GPU's forwards). Tokens are those of K single steps; outputs then arrive K tokens at a time
        and new requests join every K tokens. Rows with penalties or logprobs, and LoRA rows, take single steps."""
        for name, value in (("decode_steps", decode_steps), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.decode_steps = decode_steps
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, Transformer):
            self.model = model.to(device=device, dtype=parse_dtype(dtype)) if dtype else model.to(device)
        else:
            self.model = from_pretrained(model, device=device, dtype=dtype)
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                tokenizer = Tokenizer(model)
        self.model.eval()
        stack_projections(self.model)  # q/k/v and gate/up as one matmul each (views of one weight: no extra memory)
        self.tokenizer = tokenizer
        self.config: ModelConfig = self.model.config
        self.device = device
        self.kv_dtype = activation_dtype(self.model)  # the paged cache's dtype (never a quantized lm_head's int8)

        num_blocks = self._num_blocks(num_blocks, kv_cache_memory, block_size, max_num_seqs)
        self.max_model_len = min(self.config.max_position_embeddings, num_blocks * block_size)
        eos = set(self.config.eos_token_ids) | (set(tokenizer.stop_ids) if tokenizer is not None else set())
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len, eos)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        self.runner = Runner(self.model, num_blocks, block_size, graph_batch=max_num_seqs if cuda_graphs else 0,
                             max_blocks_per_seq=math.ceil(self.max_model_len / block_size), compile=compile)
        self.max_adapters = max_adapters
        self.lora: MultiLoRA | None = None
        self._adapter_keys: dict[str, str] = {}  # name -> prefix-cache root, new on every load
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []  # aborted requests' last outputs, returned by the next step
        self._decode_bandwidth: float | None = None  # bytes/s of recent decode-only steps (stats())
        self.weight_bytes = weight_bytes(self.model)  # what a decode step reads of the weights: fixed, counted once
        self._ids = itertools.count()
        self._loads = itertools.count()
        for name, folder in (adapters or {}).items():
            self.add_adapter(name, folder)

    def _num_blocks(self, num_blocks: int | None, memory: int | str | None, block_size: int, max_num_seqs: int) -> int:
        per_block = PagedKVCache.bytes_per_block(self.config, block_size, self.kv_dtype)
        if num_blocks is None:
            if memory is None:
                if self.device.type == "cuda":
                    memory = int(0.9 * torch.cuda.mem_get_info(self.device)[0])
                else:  # no more than every sequence at full length could ever use
                    most = max_num_seqs * math.ceil(self.config.max_position_embeddings / block_size)
                    return max(1, min(CPU_KV_CACHE_BYTES // per_block, most))
            num_blocks = parse_size(memory) // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={memory!r} holds no block of {block_size} tokens "
                                 f"({per_block} bytes each)")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return num_blocks

    # ---- requests -------------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (the model folder has no tokenizer.json); "
                                 "pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        elif not isinstance(prompt, Seq):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt token {bad!r} is not a token id in [0, {vocab})")
        if not ids:
            raise ValueError("empty prompt: it needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_model_len} tokens "
                             "(at least one new token must fit)")
        return ids

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request and return its id. Bad input raises ValueError at once and queues nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        if adapter is not None and adapter not in self._adapter_keys:
            loaded = ", ".join(self._adapter_keys) or "none"
            raise ValueError(f"unknown adapter {adapter!r} (loaded: {loaded})")
        vocab = self.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model folder has no tokenizer.json)")
        if request_id is None:
            request_id = str(next(self._ids))
            while self._in_use(request_id):  # a caller chose this id for a request of theirs
                request_id = str(next(self._ids))
        request_id = str(request_id)
        if self._in_use(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")

        arrival = next(self._ids)
        request = _Request(request_id, ids)
        for index in range(params.n):
            seq = Sequence(next(self._ids), request_id, index, ids, params, adapter,
                           self._adapter_keys.get(adapter), arrival, self.device)
            decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
            request.completions.append(_Completion(seq, decoder, StopStrings(params.stop)))
        first = request.completions[0].seq
        first.forks = [c.seq for c in request.completions[1:]]  # they branch off once the prompt is computed
        self.scheduler.add(first)
        self._requests[request_id] = request
        return request_id

    def _in_use(self, request_id: str) -> bool:
        """Running, or its last output not yet returned by step (a new request would be handed that output)."""
        return request_id in self._requests or any(o.request_id == request_id for o in self._pending)

    def abort(self, request_id: str) -> None:
        """End a request now and free its blocks; the next step returns its last output (finish_reason "abort").
        Unknown or already finished ids are ignored (a client may abort what just finished)."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return
        for completion in request.completions:
            self.scheduler.finish(completion.seq, "abort")
        self._pending.append(request.output())

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- the step -------------------------------------------------------------------------------------------

    def _step_tokens(self) -> list[Sequence]:
        """Schedule, run, postprocess: the sequences that got a new token this step."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self.decode_steps > 1 and self.runner.can_run_steps(batch):
            limits = self.scheduler.reserve_steps(batch, self.decode_steps)
            if limits is not None:
                start = time.perf_counter()
                rows = self.runner.run_steps(batch, self.decode_steps, limits)
                self._record_decode(batch, (time.perf_counter() - start) / self.decode_steps)
                self.scheduler.postprocess_steps(batch, rows)
                return list(batch.seqs)
        start = time.perf_counter()
        result = self.runner.run(batch)
        token_ids = result.token_ids.tolist()  # waits for the device: the step's time is complete here
        if all(n == 1 for n in batch.num_new_tokens):
            self._record_decode(batch, time.perf_counter() - start)
        self.scheduler.postprocess(batch, token_ids)
        sampled = []
        for (seq, _), entry in zip(batch.samples, result.logprob_entries()):
            if seq.logprobs is not None and entry is not None and len(seq.logprobs) < seq.num_output_tokens:
                seq.logprobs.append(entry)
            sampled.append(seq)
        return sampled

    def _record_decode(self, batch, seconds: float) -> None:
        """Achieved memory bandwidth of a decode-only step (as camelid.monitor.decode_bytes_per_step: every weight
        once + each sequence's KV cache, over the step's time), smoothed over recent steps for /metrics."""
        context = sum(seq.num_computed_tokens for seq in batch.seqs) // len(batch.seqs)
        moved = self.weight_bytes + kv_cache_bytes(self.config, len(batch.seqs), context, self.kv_dtype)
        rate = moved / max(seconds, 1e-9)
        previous = self._decode_bandwidth
        self._decode_bandwidth = rate if previous is None else 0.9 * previous + 0.1 * rate

    def step(self) -> list[RequestOutput]:
        """One scheduler step. Returns the requests whose output changed (finished ones included)."""
        changed: dict[str, _Request] = {}
        for seq in self._step_tokens():
            request = self._requests.get(seq.request_id)
            if request is not None:
                self._update_text(request.completions[seq.index])
                changed[seq.request_id] = request
        outputs, self._pending = self._pending, []
        for request_id, request in changed.items():
            outputs.append(request.output())
            if request.finished:
                del self._requests[request_id]
        return outputs

    def _update_text(self, c: _Completion) -> None:
        """Push the sequence's new tokens through its decoder and stop strings; end it at a stop string."""
        seq = c.seq
        if c.decoder is None:
            c.num_decoded = seq.num_output_tokens
            return
        outputs = seq.output_token_ids
        for i in range(c.num_decoded, len(outputs)):
            ended_by_token = seq.finish_reason == "stop" and i == len(outputs) - 1
            if not ended_by_token:  # a stop token is kept in token_ids but never shown as text
                c.text += c.stopper.feed(c.decoder.push(outputs[i]))
            if c.stopper.stopped:
                self.scheduler.finish(seq, "stop")
                seq.finish_reason = "stop"  # also when the same token reached max_tokens
                extra = len(outputs) - i - 1  # tokens of the same step after it (decode_steps > 1): never shown
                if extra:
                    del seq.token_ids[-extra:]
                    self.scheduler.generated_tokens -= extra
                break
        c.num_decoded = len(outputs)
        if seq.is_finished:
            c.text += c.stopper.feed(c.decoder.flush())
            c.text += c.stopper.flush()
            if c.stopper.stopped and seq.finish_reason == "length":  # a stop string held back (["b", "abc"]) ended it
                seq.finish_reason = "stop"

    # ---- convenience ----------------------------------------------------------------------------------------

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 adapter: str | None | Seq[str | None] = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order. Any bad prompt raises ValueError before any
        runs (the others are withdrawn)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, text or ids
        n = len(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params_list) != n or len(adapters) != n:
            raise ValueError(f"got {n} prompts but {len(params_list)} params and {len(adapters)} adapters")
        ids: list[str] = []
        try:
            for prompt, p, a in zip(prompts, params_list, adapters):
                ids.append(self.add_request(prompt, p, a))
        except ValueError:
            for request_id in ids:
                self.abort(request_id)
            self._pending = [o for o in self._pending if o.request_id not in ids]
            raise
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, desc="generate")
        wanted = set(ids)
        while len(done) < n:
            for out in self.step():
                if out.request_id not in wanted:
                    self._keep_for_next_step(out)
                elif out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Yield the text of completion 0 piece by piece as it is generated. Closing the iterator aborts it."""
        request_id = self.add_request(prompt, params, adapter)
        sent, finished = 0, False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id != request_id:
                        self._keep_for_next_step(out)
                    else:
                        text, finished = out.outputs[0].text, out.finished
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
        finally:
            if not finished:
                self.abort(request_id)
                self._pending = [o for o in self._pending if o.request_id != request_id]

    def _keep_for_next_step(self, out: RequestOutput) -> None:
        """An output of a request queued with add_request that generate / stream stepped past: the caller's next
        step() returns it (its latest only), so a request that finished meanwhile is not lost."""
        self._pending = [o for o in self._pending if o.request_id != out.request_id] + [out]

    # ---- adapters and stats ---------------------------------------------------------------------------------

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT LoRA folder as adapter `name`; requests may use it from the next add_request on."""
        if self.lora is None:
            self.lora = MultiLoRA(self.model, self.max_adapters)
            self.runner.lora = self.lora
        self.lora.add(name, folder)
        self._adapter_keys[name] = f"{name}#{next(self._loads)}"  # a reload never hits the old adapter's cache

    def remove_adapter(self, name: str) -> None:
        """Unload adapter `name`; ValueError while a request still uses it."""
        users = [r.request_id for r in self._requests.values() if r.completions[0].seq.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by request {users[0]!r}; abort it or wait")
        if self.lora is None or name not in self._adapter_keys:
            raise ValueError(f"unknown adapter {name!r} (loaded: {', '.join(self._adapter_keys) or 'none'})")
        self.lora.remove(name)
        del self._adapter_keys[name]

    def stats(self) -> dict:
        s, bm = self.scheduler, self.block_manager
        return {"num_waiting": len(s.waiting), "num_running": len(s.running), "num_blocks": bm.num_blocks,
                "num_free_blocks": bm.num_free_blocks, "block_size": bm.block_size,
                "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
                "prompt_tokens_computed": s.prompt_tokens_computed, "generated_tokens": s.generated_tokens,
                "num_preemptions": s.num_preemptions,
                **({"decode_bandwidth_bytes_per_s": self._decode_bandwidth} if self._decode_bandwidth else {})}
