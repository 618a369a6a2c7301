"""Quantization formats one layer at a time: round-trip error bounds, NF4 against torchao's own dequantizer,
layer outputs against fp32, and the backward pass QLoRA trains through."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camelid.quant import FORMATS, Int4Linear, Int8Linear, NF4Linear, quantize_model
from camelid.quant.int4 import pack_int4, unpack_int4
from camelid.quant.nf4 import NF4_LEVELS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchao import noise


def linear(out_features: int = 96, in_features: int = 256, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02).add_(torch.randn(out_features, 1) * 0.01)  # rows with offsets, as trained
    return layer


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    lin = linear()
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    err = (q.dequantize(torch.float32) - lin.weight).abs()  # (out, in)
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()
    # the largest magnitude of each row is representable exactly: +-127 * scale
    assert torch.allclose(q.weight_scale * 127, lin.weight.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(group_size):
    lin = linear()
    q = Int4Linear.from_linear(lin, group_size=group_size)
    assert q.weight.shape == (96, 128) and q.weight.dtype == torch.uint8  # two codes per byte
    assert q.weight_scale.shape == (96, 256 // group_size)
    err = (q.dequantize(torch.float32) - lin.weight).abs().view(96, -1, group_size)
    bound = q.weight_scale.float()[..., None] / 2 * (1 + 1e-3) + 1e-6
    assert (err <= bound).all()
    # asymmetric: each group's minimum is code 0 (exact up to the fp16 rounding of `low`)
    w = lin.weight.view(96, -1, group_size)
    assert torch.allclose(q.weight_low.float(), w.amin(-1), rtol=1e-3, atol=0)


def test_int4_pack_round_trip_covers_every_code():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(codes)
    assert packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("shape", [(128, 128), (64, 128), (96, 256)])  # the last two need padding
def test_nf4_dequantization_matches_torchao_bit_for_bit(shape):
    nf4 = pytest.importorskip("torchao.quantization")
    lin = linear(*shape, bias=False)
    q = NF4Linear.from_linear(lin)
    numel = lin.weight.numel()
    padded = q.weight.numel() * 2
    flat = torch.cat([lin.weight.detach().flatten(), torch.zeros(padded - numel)])
    reference = nf4.to_nf4(flat, 64, 256).get_original_weight()[:numel].view(shape)
    assert torch.equal(q.dequantize(torch.float32), reference)


def test_nf4_round_trip_error_bound_and_double_quantized_scales():
    lin = linear(128, 256, bias=False)
    q = NF4Linear.from_linear(lin)
    assert q.weight_absmax.dtype == torch.int8 and q.weight_absmax.numel() == 128 * 256 // 64
    assert q.weight_absmax_factor.numel() == 128 * 256 // 64 // 256  # one fp32 per 256 block scales
    blocks = lin.weight.detach().reshape(-1, 64)
    err = (q.dequantize(torch.float32).reshape(-1, 64) - blocks).abs()
    levels = torch.tensor(NF4_LEVELS)
    half_gap = (levels[1:] - levels[:-1]).max() / 2  # the widest rounding interval of the code book
    # plus the 8-bit error of the block scale itself (a few % of absmax at most)
    assert (err <= blocks.abs().amax(1, keepdim=True) * (half_gap + 0.03)).all()


# rounding to a grid of step d leaves an error of std d / sqrt(12): for gaussian weights that is ~0.4% of the
# weights' std at int8 (255 steps over ~6 std per row) and ~10% at 4 bits (15 steps over ~5 std per group)
@pytest.mark.parametrize("method,rel_bound", [("int8", 0.01), ("int4", 0.12), ("nf4", 0.12)])
def test_quantized_linear_output_is_close_to_fp32(method, rel_bound):
    lin = linear()
    options = {"group_size": 128} if method == "int4" else {}
    q = FORMATS[method].from_linear(lin, **options)
    x = torch.randn(4, 7, 256)
    want, got = lin(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = (got - want).norm() / want.norm()
    assert rel < rel_bound, f"{method}: relative output error {rel:.4f}"
    # and it is exactly the matmul with the dequantized weight
    torch.testing.assert_close(got, F.linear(x, q.dequantize(torch.float32), lin.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(FORMATS))
def test_fp16_forward_stays_finite_where_the_output_fits_fp16(method):
    # all-positive rows and inputs: the true outputs are ~40, but int8's unscaled products (q up to 127) sum past
    # fp16's 65504 unless the scale is applied first
    lin = nn.Linear(1024, 8, bias=False)
    with torch.no_grad():
        lin.weight.uniform_(0.02, 0.06)
    options = {"group_size": 128} if method == "int4" else {}
    q = FORMATS[method].from_linear(lin, **options).half()
    x = torch.full((2, 1024), 2.0)
    with torch.no_grad():
        got = q(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), lin(x).detach(), rtol=0.02, atol=0.0)


@pytest.mark.parametrize("method", list(FORMATS))
def test_backward_gives_the_input_gradient_without_saving_a_float_weight(method):
    lin = linear()
    q = FORMATS[method].from_linear(lin)
    x = torch.randn(3, 256, requires_grad=True)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.square().sum().backward()
    assert (96, 256) not in saved_shapes  # the dequantized weight is rebuilt in backward, never kept
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, q.dequantize(torch.float32), lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert all(not b.requires_grad for b in q.buffers())


def test_quantize_model_keeps_names_skips_lm_head_and_checks_shapes():
    from model_zoo import random_model, tiny_config

    model = random_model(tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    quantize_model(model, "int4", group_size=64)
    for n in names:
        assert isinstance(model.get_submodule(n), Int4Linear)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: int4 group_size 96"):
        quantize_model(random_model(tiny_config(hidden_size=96, intermediate_size=144)), "int4", group_size=96)
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="int4 group_size 0 must be"):  # not silently the default 128
        quantize_model(random_model(tiny_config(hidden_size=128, intermediate_size=256)), "int4", group_size=0)
