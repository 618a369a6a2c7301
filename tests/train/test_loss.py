"""The fused linear cross-entropy (camelid/train/loss.py) against plain autograd through the model's logits and
F.cross_entropy: the same loss and the same gradients, and the fallback to the chunked path where the head is not a
plain Linear."""

import copy

import pytest
import torch
import torch.nn.functional as F

from camelid.peft.lora import apply_lora
from camelid.peft.prompt import apply_prompt
from camelid.train.loss import IGNORE_INDEX, fusable_head, fused_chunk_rows, linear_cross_entropy, loss_fn
from model_zoo import ARCH_CONFIGS, random_model, tiny_config


def make_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :7] = IGNORE_INDEX  # a prompt that is not trained on
    return {"input_ids": ids, "labels": labels}


def reference(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = copy.deepcopy(model)
    loss = compute(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    """Same loss and gradients up to fp32 summation order (relative to each tensor's norm: gemma's gradients reach
    ~80, where one ulp is already ~1e-5)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).norm() <= tol * grads_b[name].norm(), name


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # gemma: lm_head tied to the embeddings
def test_fused_equals_autograd_through_the_logits(arch):
    model = random_model(tiny_config(**ARCH_CONFIGS[arch]))
    assert fusable_head(model) is model.lm_head
    batch = make_batch(model.config.vocab_size)
    assert_same(loss_and_grads(model, lambda m: loss_fn(m, batch)), loss_and_grads(model, lambda m: reference(m, batch)))


def test_many_uneven_chunks_give_the_same_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (50,))
    labels[::3] = IGNORE_INDEX
    results = []
    for chunk in (7, 50):
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
        (2.5 * loss).backward()  # a scaled loss (the loop divides by the target count): backward scales the grads
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    hidden.grad = weight.grad = None
    (2.5 * want).backward()
    for loss, grad_hidden, grad_weight in results:
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(grad_hidden, hidden.grad)
        torch.testing.assert_close(grad_weight, weight.grad)


def test_bf16_autocast_matches_the_chunked_path():
    """Under autocast both run lm_head in bf16 and the softmax in fp32; the fused one rounds no (N, V) tensor to
    bf16, so the two agree to bf16 precision, not bit for bit."""
    model = random_model(tiny_config())
    batch = make_batch(model.config.vocab_size, seed=1)

    def under_autocast(fused):
        def compute(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss_fn(m, batch, fused=fused)
        return compute

    fused, chunked = loss_and_grads(model, under_autocast(True)), loss_and_grads(model, under_autocast(False))
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-3, atol=0)
    for name, grad in chunked[1].items():
        assert grad.dtype == fused[1][name].dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert (fused[1][name] - grad).norm() <= 0.02 * grad.norm(), name


def test_evaluation_needs_no_gradients(monkeypatch):
    """Under no_grad the Function forms no gradient: a parameter input would otherwise still say it needs one, and
    every eval batch would build lm_head's (V, H) gradient for nothing."""
    from camelid.train.loss import LinearCrossEntropy

    model = random_model(tiny_config())
    batch = make_batch(model.config.vocab_size)
    seen = []
    forward = LinearCrossEntropy.forward
    monkeypatch.setattr(LinearCrossEntropy, "forward",
                        staticmethod(lambda ctx, *args: seen.append(ctx.needs_input_grad[:2]) or forward(ctx, *args)))
    with torch.no_grad():
        fused, chunked = loss_fn(model, batch), loss_fn(model, batch, fused=False)
    assert seen == [(False, False)]
    assert not fused.requires_grad
    torch.testing.assert_close(fused, chunked)


def test_heads_the_fused_loss_cannot_take_fall_back():
    model = random_model(tiny_config())
    lora_head = apply_lora(copy.deepcopy(model), r=2, target_modules=["lm_head", "q_proj"])
    assert fusable_head(lora_head) is None
    hooked = copy.deepcopy(model)
    hooked.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    assert fusable_head(hooked) is None
    batch = make_batch(model.config.vocab_size)
    assert_same(loss_and_grads(hooked, lambda m: loss_fn(m, batch)), loss_and_grads(hooked, lambda m: reference(m, batch)))
    assert fusable_head(torch.compile(model)) is model.lm_head  # wrappers are looked through
    with torch.autocast("cpu", dtype=torch.float16):  # fp16: the GradScaler must scale the gradients first
        assert fusable_head(model) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable_head(model) is model.lm_head
    assert fusable_head(copy.deepcopy(model).half()) is None


def test_prompt_tuning_drops_the_soft_tokens_from_the_hidden_states():
    """The prompt hook slices the soft tokens' rows off the output, hidden states as well as logits."""
    torch.manual_seed(0)
    model = apply_prompt(random_model(tiny_config()), num_virtual_tokens=4)
    batch = make_batch(model.config.vocab_size, seed=2)
    assert_same(loss_and_grads(model, lambda m: loss_fn(m, batch)), loss_and_grads(model, lambda m: reference(m, batch)))


def test_chunk_rows_follow_the_vocabulary():
    assert fused_chunk_rows(32_000) == 2097 and fused_chunk_rows(128_256) == 523 and fused_chunk_rows(10**12) == 1


def test_fsdp_shards_take_the_chunked_path_even_compiled(tmp_path):
    """A sharded lm_head is not the whole matrix outside the forward: the fused loss steps aside, also when the
    sharded model sits under torch.compile's wrapper (one process, a gloo group of 1)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = random_model(tiny_config())
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert fusable_head(model) is None and fusable_head(torch.compile(model)) is None
    finally:
        dist.destroy_process_group()
