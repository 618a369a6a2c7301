"""How much GPU memory a training or inference run needs, term by term, from the config alone.

Each term's formula sits next to its code. Symbols: P parameters (`num_parameters`), T trainable parameters, L
layers, h hidden, q = heads x head_dim, kv = KV heads x head_dim, i intermediate, V vocab, B micro-batch, S sequence
length, b bytes per activation element (2 for bf16/fp16, 4 for fp32).

What the numbers assume (camelid's own training loop):
- full fine-tuning / pretraining keeps fp32 master weights and runs the matmuls under autocast; the half-precision
  weight copies autocast makes are saved for backward, so they are a term of their own; with precision bf16-true
  the weights, gradients and optimizer states are bf16 themselves (2 bytes each, no copies);
- PEFT methods keep the frozen base in the compute dtype (bf16/fp16; fp32 with --precision fp32) and their
  trainable parameters, gradients and optimizer states in fp32;
- attention is SDPA with a flash / memory-efficient kernel: no (S x S) score matrix is stored;
- the loss is camelid's fused linear cross-entropy (camelid/train/loss.py: no logits kept, gradients computed
  one fp32 chunk of logits at a time); with FSDP-style sharding over several GPUs, its chunked cross-entropy (bf16
  logits kept, fp32 log-softmax one 4096-token chunk at a time).
What it leaves out: the CUDA context and allocator fragmentation (`fit` adds a margin for those), and torch's
per-op workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from camelid.config import ModelConfig, num_parameters

METHODS = ("full", "lora", "qlora", "dora", "prefix", "prompt", "adapter", "bitfit", "ia3", "inference")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4, "bf16-true": 2}  # bytes per activation element
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "lion", "sgd")  # training's (train/config.py), and sgd
EIGHT_BIT_BLOCK = 256  # values per fp32 scale of an 8-bit optimizer state (torchao's AdamW8bit, bitsandbytes)
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
LORA_TARGETS = {"qv": ("q", "v"), "all": ("q", "k", "v", "o", "gate", "up", "down")}
NUM_VIRTUAL_TOKENS = 20  # prompt / prefix tuning: the PEFT library's usual setting
ADAPTER_SIZE = 64  # bottleneck width of a Houlsby adapter, two per block
CE_CHUNK = 4096  # tokens per fp32 cross-entropy chunk (camelid.train.loss.CE_CHUNK)
FUSED_CHUNK_BYTES = 2**28  # fp32 logits per chunk of the fused loss (camelid.train.loss.FUSED_CHUNK_BYTES)
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # QLoRA: 64 weights per absmax, 256 absmaxes per second-level fp32 constant


# what backward consumes as it goes: these are gone by the time every gradient exists (`MemoryEstimate.total`)
FREED_BY_BACKWARD = ("activations", "autocast_weight_copies", "loss", "logits", "backward_buffers", "alibi_bias")


@dataclass
class MemoryEstimate:
    """Bytes per GPU, term by term; `formulas` says how each was computed."""

    terms: dict[str, float]
    formulas: dict[str, str]
    parameters: int
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The peak. Backward frees the saved activations layer by layer while it fills in the gradients, and the
        two grow and shrink in step, so the peak holds the larger of the two groups, not both (measured on an H100:
        summing them overestimated full fine-tuning by ~20%, benchmarks/memory_check.py)."""
        grads = self.terms.get("gradients", 0.0)
        forward = sum(v for k, v in self.terms.items() if k in FREED_BY_BACKWARD)
        static = sum(v for k, v in self.terms.items() if k != "gradients" and k not in FREED_BY_BACKWARD)
        return static + max(grads, forward)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "parameters": self.parameters, "trainable_parameters": self.trainable,
                "terms": {k: {"bytes": v, "formula": self.formulas[k]} for k, v in self.terms.items()},
                "notes": self.notes}


def _linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection in one block (one expert's for a MoE)."""
    h, i = c.hidden_size, c.intermediate_size
    return {"q": (h, c.q_size), "k": (h, c.kv_size), "v": (h, c.kv_size), "o": (c.q_size, h),
            "gate": (h, i), "up": (h, i), "down": (i, h)}


def _experts(c: ModelConfig) -> int:
    return c.num_local_experts or 1


def quantized_params(c: ModelConfig) -> int:
    """Weights QLoRA stores in NF4: every projection of every block (embeddings, lm_head and norms stay bf16)."""
    shapes = _linear_shapes(c)
    attn = sum(a * b for k, (a, b) in shapes.items() if k in "qkvo")
    mlp = sum(a * b for k, (a, b) in shapes.items() if k in ("gate", "up", "down")) * _experts(c)
    return c.num_hidden_layers * (attn + mlp)


def trainable_params(c: ModelConfig, method: str, lora_r: int = 8, lora_targets: str = "qv") -> int:
    L, shapes = c.num_hidden_layers, _linear_shapes(c)
    if method == "full":
        return num_parameters(c)
    if method in ("lora", "qlora", "dora"):
        per_layer = 0
        for name in LORA_TARGETS[lora_targets]:
            n_in, n_out = shapes[name]
            copies = _experts(c) if name in ("gate", "up", "down") else 1
            per_layer += copies * lora_r * (n_in + n_out)  # A: r x in, B: out x r
            if method == "dora":
                per_layer += copies * n_out  # the magnitude vector, one per output row
        return L * per_layer
    if method == "prefix":
        return L * 2 * c.kv_size * NUM_VIRTUAL_TOKENS  # a key and a value per virtual token and layer
    if method == "prompt":
        return NUM_VIRTUAL_TOKENS * c.hidden_size  # input embeddings of the virtual tokens
    if method == "adapter":
        return L * 2 * (2 * c.hidden_size * ADAPTER_SIZE + ADAPTER_SIZE + c.hidden_size)  # down + up, with biases
    if method == "bitfit":  # a bias on every Linear but lm_head, zeros added where there is none (peft/bitfit.py)
        per_layer = c.q_size + 2 * c.kv_size + c.hidden_size + (2 * c.intermediate_size + c.hidden_size) * _experts(c)
        return L * (per_layer + c.num_local_experts)  # + the MoE router's
    if method == "ia3":
        return L * (2 * c.kv_size + c.intermediate_size)  # l_k, l_v, l_ff (Liu et al. 2022)
    return 0  # inference


def num_param_tensors(c: ModelConfig) -> int:
    """Parameter tensors of the full model (AdamW keeps one `step` scalar per tensor)."""
    per_layer = 4 + 3 * _experts(c) + 2 + (c.num_local_experts > 0)  # projections, norms, router
    per_layer += 3 * c.qkv_bias + c.o_bias + 3 * c.mlp_bias * _experts(c)
    return c.num_hidden_layers * per_layer + 1 + (not c.tie_word_embeddings) + 1 + (c.position_encoding == "learned")


def activation_bytes_per_token_layer(c: ModelConfig, method: str, b: int, lora_targets: str = "qv",
                                     resid: int | None = None, compiled: bool = False, lora_r: int = 8
                                     ) -> tuple[float, str]:
    """Bytes one block saves for backward, per token. A tensor is saved when backward needs it: a projection's
    input only when its weight trains or an adapter reads that input (a frozen weight's input gradient needs only
    the weight), but the gate product, SDPA and RMSNorm save theirs whenever any gradient flows through. RMSNorm
    and the gate product keep only their inputs (camelid/recompute.py). `resid`: bytes per element of the residual
    stream, the norms' input (default b). A trained plain down_proj keeps no input: it is rebuilt from gate and up
    (camelid/recompute.py's gated_linear). `compiled`: torch.compile with camelid's activation memory budget
    (camelid/train/compile.py): the norm outputs and down_proj's input are recomputed in backward, each norm keeps
    its fp32 inverse RMS. Checked tensor by tensor against the saved tensors of autograd and of the compiled graph
    (tests/plan/test_memory.py)."""
    resid = b if resid is None else resid
    h, q, kv, i = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    k = c.num_experts_per_tok if c.num_local_experts else 1  # a MoE token runs through k experts
    reads = {"full": set(LORA_TARGETS["all"]), "lora": set(LORA_TARGETS[lora_targets])}
    reads["qlora"] = reads["dora"] = reads["lora"]
    reads["ia3"] = {"down"}  # l_ff scales down's input, so that input is saved for l_ff's gradient
    inputs = reads.get(method, set())
    terms = [
        (f"2 RMSNorm inputs ({resid} bytes)", 2 * resid * h),
        ("attn norm output (q/k/v input)", b * h if inputs & {"q", "k", "v"} else 0),
        # flash returns the output in (B, T, nh, hd) memory, so o_proj's input is a view of it, not a copy
        ("SDPA q, k, v, output + fp32 logsumexp", b * (2 * q + 2 * kv) + 4 * c.num_attention_heads),
        ("mlp norm output (gate/up input)", b * h * k if inputs & {"gate", "up"} else 0),
        ("gate out, up out", 2 * b * i * k),
        # full training's plain down_proj rebuilds its input from gate and up in backward (recompute.gated_linear);
        # an adapter or IA3 on it keeps that input
        ("down_proj input", b * i * k if "down" in inputs and method != "full" else 0),
        ("adapter inputs + bottleneck", 2 * b * (h + 2 * ADAPTER_SIZE) if method == "adapter" else 0),
        ("LoRA A outputs (B's input)", b * lora_r * len(inputs) if method in ("lora", "qlora") else 0),
    ]
    if compiled:  # recomputed from the norm inputs and from gate / up, which are kept anyway
        recomputed = ("attn norm output (q/k/v input)", "mlp norm output (gate/up input)", "down_proj input")
        terms = [(name, n) for name, n in terms if name not in recomputed] + [("2 fp32 inverse RMS", 2 * 4)]
    formula = " + ".join(f"{name} {n:g}" for name, n in terms if n)
    return float(sum(n for _, n in terms)), formula


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


Terms = list[tuple[str, float, str]]  # (name, bytes, formula), in the order the table shows them


def _weight_terms(c: ModelConfig, method: str, precision: str, P: int, T: int, m: int) -> Terms:
    b, pure = PRECISIONS[precision], precision == "bf16-true"
    if method == "full" and pure:
        return [("weights", 2 * P, "2 P (bf16 weights, bf16-true)")]
    if method == "full":
        return [("weights", 4 * P, "4 P (fp32 master weights; autocast runs the matmuls in half precision)")]
    if method == "qlora":
        Q = quantized_params(c)
        nf4 = Q * (0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_BLOCK2))
        rest = 4 if precision == "fp32" else 2  # fp32 (a CPU run): the float embeddings / norms stay fp32
        return [("weights", nf4 + rest * (P - Q) + 4 * T,
                 "Q (0.5 + 1/64 + 4/(64*256)) NF4 + 8-bit absmax + fp32 second-level constants, "
                 f"{rest} (P - Q) {'fp32' if rest == 4 else 'bf16'} embeddings/norms, 4 T fp32 adapters")]
    if method == "inference":
        return [("weights", b * P, f"{b} P (weights in {precision})")]
    return [("weights", b * P + m * T, f"{b} P frozen base in {precision} + {m} T {'bf16' if m == 2 else 'fp32'} "
                                       "trainable")]


def _gradient_and_optimizer_terms(c: ModelConfig, method: str, optimizer: str, T: int, m: int) -> Terms:
    """m bytes per gradient and per optimizer state element, trainable parameters only."""
    kind = "bf16" if m == 2 else "fp32"
    eight_bit = 2 + 8 / EIGHT_BIT_BLOCK  # two uint8 moments, each with an fp32 scale per block
    per_param = {"adamw": 2 * m, "adamw8bit": eight_bit, "paged_adamw8bit": eight_bit, "lion": m, "sgd": m}[optimizer]
    steps = 4 * (num_param_tensors(c) if method == "full" else 0) if optimizer == "adamw" else 0
    return [("gradients", m * T, f"{m} T ({kind}, one per trainable parameter)"),
            ("optimizer", per_param * T + steps, {
                "adamw": f"{2 * m} T (exp_avg + exp_avg_sq, {kind})"
                         + (" + 4 x parameter tensors (`step`)" if steps else ""),
                "adamw8bit": "(2 + 8/256) T (two 8-bit states + an fp32 scale per 256-value block, torchao's "
                             "AdamW8bit)",
                "paged_adamw8bit": "(2 + 8/256) T (bitsandbytes' 8-bit states, 256-value blocks; paged to CPU memory "
                                   "under pressure, so at most this on the GPU)",
                "lion": f"{m} T (one {kind} momentum)",
                "sgd": f"{m} T (one {kind} momentum buffer; SGD without momentum keeps none)"}[optimizer])]


def _shard(c: ModelConfig, terms: dict[str, float], formulas: dict[str, str], gpus: int, strategy: str, b: int,
           m: int, P: int) -> Terms:
    """Divides the sharded terms by the GPU count in place; returns the terms sharding adds."""
    shard = {"ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradients"),
             "zero3": ("optimizer", "gradients", "weights"), "fsdp": ("optimizer", "gradients", "weights")}
    for name in shard[strategy]:
        terms[name] /= gpus
        formulas[name] = f"({formulas[name]}) / {gpus} GPUs ({strategy})"
    added: Terms = []
    if strategy == "ddp":
        added.append(("ddp_buckets", terms["gradients"], f"{m} T (DDP's all-reduce buckets: a second copy of the "
                                                         "gradients)"))
    if strategy in ("zero3", "fsdp"):
        layer = (P - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)) / c.num_hidden_layers
        added.append(("gathered_layers", 2 * b * layer, f"2 x {b} x P_layer (this block and the prefetched next, "
                                                        "gathered)"))
    return added


def _activation_terms(c: ModelConfig, method: str, precision: str, S: int, batch: int, checkpointing: bool,
                      lora_targets: str, compiled: bool, lora_r: int, P: int, resid: int) -> Terms:
    """What the forward pass saves for backward: the blocks' activations and autocast's weight copies."""
    b, pure, L, h = PRECISIONS[precision], precision == "bf16-true", c.num_hidden_layers, c.hidden_size
    per_tok, detail = activation_bytes_per_token_layer(c, method, b, lora_targets, resid, compiled, lora_r)
    if checkpointing:
        terms = [("activations", batch * S * (L * resid * h + per_tok),
                  f"B S (L x {resid} h block inputs + one block recomputed: {per_tok:g})")]
    else:
        terms = [("activations", batch * S * L * per_tok, f"B S L x [{detail}] per token per layer")]
    if method == "full":
        # autocast's half copies of every matmul weight, saved for backward (the gradient of the input)
        down = L * h * c.intermediate_size * _experts(c)  # recompute.gated_linear casts these again in backward
        terms.append(("autocast_weight_copies",
                      2 * (P - c.vocab_size * h * (0 if c.tie_word_embeddings else 1) - down)
                      if b == 2 and not pure else 0,
                      "2 x matmul weights (P less the embedding table and down_proj) in half precision; 0 for fp32 "
                      "and bf16-true"))
    return terms


def _loss_terms(c: ModelConfig, method: str, precision: str, S: int, batch: int, gpus: int, strategy: str,
                resid: int) -> Terms:
    b, pure, V, h = PRECISIONS[precision], precision == "bf16-true", c.vocab_size, c.hidden_size
    if gpus > 1 and strategy in ("fsdp", "zero2", "zero3"):  # sharded lm_head: the chunked loss
        chunk = min(batch * S, CE_CHUNK)
        return [("logits", batch * S * V * 2 * b + chunk * V * 2 * 4,
                 f"B S V x 2 x {b} (logits kept for backward + their gradient) + {chunk} x V x 8 (fp32 CE chunk)")]
    rows = min(batch * S, max(1, FUSED_CHUNK_BYTES // (4 * V)))
    copy = b == 2 and not pure  # autocast's half copy of an fp32 lm_head
    head = (V * h * b if copy else 0) + V * h * (4 + b) if method == "full" else 0
    # CUDA: the chunk's logits in b bytes, overwritten in place by their gradient (camelid/train/triton_ce.py;
    # without Triton, an fp32 copy and a b-byte gradient: 4 + b bytes)
    return [("loss", batch * S * h * resid + rows * V * b + head,
             f"B S h x {resid} (gradient of the hidden states) + {rows} x V x {b} (a logits chunk, overwritten by "
             "its gradient)" + (f" + V h ({'2 + ' if copy else ''}4 + {b}) (lm_head"
                                f"{' in half precision' if copy else ''}, its fp32 gradient and a "
                                "chunk's product)" if method == "full" else ""))]


def _inference_terms(c: ModelConfig, seq: int, batch: int, b: int, kv_context: int | None) -> Terms:
    h, ctx = c.hidden_size, kv_context if kv_context is not None else seq
    return [("kv_cache", 2 * c.num_hidden_layers * c.kv_size * ctx * batch * b,
             f"2 (k, v) x L x kv x {ctx} tokens x B x {b}"),
            ("activations", batch * seq * (2 * h + c.q_size + 2 * c.kv_size + 2 * c.intermediate_size) * b,
             "B S (2h + q + 2kv + 2i) b (one block's working set during prefill)"),
            ("logits", batch * c.vocab_size * (b + 4), "B V (b + 4) (last position only, fp32 for sampling)")]


def _method_extra_terms(c: ModelConfig, method: str, b: int, lora_targets: str) -> Terms:
    if method == "qlora":
        biggest = max(a * o for a, o in _linear_shapes(c).values())
        return [("dequant_buffer", 2 * biggest, "2 x largest projection (one weight dequantized to bf16 at a time)")]
    if method == "dora":
        biggest = max(a * o for n, (a, o) in _linear_shapes(c).items() if n in LORA_TARGETS[lora_targets])
        return [("dora_weight_norm", 2 * b * biggest,
                 "2 x b x largest adapted weight (W + BA and its norm, per layer)")]
    return []


def estimate(config: ModelConfig, method: str = "full", seq: int = 512, batch: int = 1, precision: str = "bf16",
             optimizer: str = "adamw", checkpointing: bool = False, gpus: int = 1, strategy: str = "ddp",
             kv_context: int | None = None, lora_r: int = 8, lora_targets: str = "qv",
             compiled: bool = False) -> MemoryEstimate:
    """Peak memory per GPU of one training step (forward + backward + optimizer) or of inference with a KV cache.
    `compiled`: the model runs under torch.compile with camelid's activation memory budget (training `compile: true`)."""
    c = config
    _check(c, method, seq, batch, precision, optimizer, checkpointing, gpus, strategy, kv_context, lora_r, lora_targets)
    b = PRECISIONS[precision]
    pure = precision == "bf16-true"  # trainable weights, their gradients and optimizer states in bf16
    m = 2 if pure and method != "qlora" else 4  # bytes per trainable element (QLoRA adapters stay fp32 over NF4)
    P = num_parameters(c)
    T = trainable_params(c, method, lora_r, lora_targets)
    train = method != "inference"
    S = seq + (NUM_VIRTUAL_TOKENS if method == "prompt" else 0)  # prompt tuning lengthens every sequence
    resid = 4 if (method == "full" and not pure) or precision == "fp32" else b  # the residual stream's dtype
    terms: dict[str, float] = {}
    formulas: dict[str, str] = {}
    notes: list[str] = []

    def put(new: Terms) -> None:
        for name, value, formula in new:
            terms[name], formulas[name] = float(value), formula

    put(_weight_terms(c, method, precision, P, T, m))
    if train:
        put(_gradient_and_optimizer_terms(c, method, optimizer, T, m))
        if gpus > 1:
            put(_shard(c, terms, formulas, gpus, strategy, b, m, P))
        put(_activation_terms(c, method, precision, S, batch, checkpointing, lora_targets, compiled, lora_r, P, resid))
        put(_loss_terms(c, method, precision, S, batch, gpus, strategy, resid))
        put([("backward_buffers", batch * S * (2 * c.intermediate_size + c.hidden_size) * b,
              "B S (2 i + h) b (gradients in flight through one block)")])
    else:
        put(_inference_terms(c, seq, batch, b, kv_context))
    put(_method_extra_terms(c, method, b, lora_targets))
    if c.position_encoding == "alibi":
        put([("alibi_bias", batch * c.num_attention_heads * S * (S if train else (kv_context or S)) * b,
              "B nh S S b (ALiBi's additive bias is materialised: no flash kernel)")])
        notes.append("ALiBi: SDPA falls back to the memory-efficient kernel with a materialised bias")
    if method == "prefix":
        notes.append(f"prefix: {NUM_VIRTUAL_TOKENS} virtual keys/values per layer (negligible activations)")
    return MemoryEstimate(terms, formulas, P, T, notes)


def _check(c: ModelConfig, method: str, seq: int, batch: int, precision: str, optimizer: str, checkpointing: bool,
           gpus: int, strategy: str, kv_context: int | None, lora_r: int, lora_targets: str) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(method in METHODS, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    need(precision in PRECISIONS, f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    need(optimizer in OPTIMIZERS, f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    need(strategy in STRATEGIES, f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    need(lora_targets in LORA_TARGETS,
         f"unknown LoRA targets {lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}")
    for name, value in (("--seq", seq), ("--batch", batch), ("--gpus", gpus), ("LoRA rank", lora_r)):
        need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
    need(kv_context is None or (isinstance(kv_context, int) and kv_context > 0),
         f"--kv-context must be a positive integer, got {kv_context!r}")
    if method == "inference":
        need(not checkpointing, "--checkpointing is for training; inference stores no activations for backward")
        need(gpus == 1, "--gpus/--strategy model training only; inference is estimated for one GPU")
        need(kv_context is None or kv_context >= seq, f"--kv-context ({kv_context}) must be at least --seq ({seq})")
    else:
        need(kv_context is None, f"--kv-context is for --method inference; {method} trains (no KV cache)")
    if strategy in ("fsdp", "zero2", "zero3") and gpus > 1:
        need(precision != "fp16", f"{strategy} with fp16 needs a sharded gradient scaler camelid lacks; use bf16")
    # pretrain and finetune refuse a seq_len past the context (RoPE included), so no estimate for one either
    need(max(seq, kv_context or 0) <= c.max_position_embeddings,
         f"the model's positions end at {c.max_position_embeddings}; --seq/--kv-context cannot go past them")


def format_table(est: MemoryEstimate, title: str) -> str:
    width = max(len(k) for k in est.terms)
    lines = [title, f"  parameters {est.parameters:,}, trainable {est.trainable:,}"]
    for name, value in est.terms.items():
        lines.append(f"  {name:<{width}}  {_gb(value):>10}   {est.formulas[name]}")
    peak_rule = ("peak: the rest + max(gradients, activation-side terms): backward frees activations as it fills "
                 "gradients") if "gradients" in est.terms else ""
    lines.append(f"  {'peak':<{width}}  {_gb(est.total):>10}   {peak_rule}".rstrip())
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)
