"""The Triton NF4 dequantization kernel (camelid/quant/triton_nf4.py), run on CPU through Triton's interpreter:
bit for bit the PyTorch path (itself bit for bit torchao's dequantizer, tests/quant/test_formats.py), in fp32, bf16
and fp16, for shapes that need padding and a final partial program; and NF4Linear dispatches to it on CUDA."""

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torchao.quantization")

from camelid.quant import triton_nf4  # noqa: E402
from camelid.quant.nf4 import NF4Linear, _tables  # noqa: E402
from triton_interpreter import interpreter  # noqa: E402,F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchao import noise


def nf4_layer(out_features: int, in_features: int, seed: int = 0) -> NF4Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    lin.weight.data.mul_(torch.rand(out_features, 1) * 4)  # rows of different scales: many different absmax
    return NF4Linear.from_linear(lin)


def kernel(q: NF4Linear, dtype: torch.dtype) -> torch.Tensor:
    levels, _ = _tables(q.weight.device)
    o = q.options
    return triton_nf4.dequantize(q.weight, q.weight_absmax, q.weight_absmax_factor, q.weight_absmax_mean, levels,
                                 q.out_features * q.in_features, dtype, o["block_size"], o["scaler_block_size"])


# (96, 256) and (40, 200) are padded to whole 64 x 256 units; (256, 520) spans several programs, the last partial
@pytest.mark.parametrize("shape", [(128, 128), (96, 256), (40, 200), (256, 520)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_the_pytorch_path_bit_for_bit(interpreter, shape, dtype):
    q = nf4_layer(*shape)
    got = kernel(q, dtype).view(shape)
    want = NF4Linear.dequantize_buffers(q, dtype, q.options)  # on CPU: the PyTorch path
    if dtype == torch.bfloat16:
        # Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even, as torch does and
        # the CUDA test below checks): compare with the fp32 weights truncated, which still pins every code, block
        # and scale; rounding the other way moves at most one bf16 step
        fp32 = NF4Linear.dequantize_buffers(q, torch.float32, q.options)
        truncated = (fp32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits cleared
        assert torch.equal(got, truncated)
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()
    else:
        assert got.dtype == dtype and torch.equal(got, want)


def test_cuda_layers_dispatch_to_the_kernel(monkeypatch):
    """On a CUDA weight with the kernel available, dequantize_buffers returns the kernel's output (checked on CPU by
    pretending: is_cuda is what the dispatch reads)."""
    q = nf4_layer(64, 128)
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        return torch.zeros(64 * 128)

    monkeypatch.setattr(triton_nf4, "available", lambda: True)
    monkeypatch.setattr(triton_nf4, "dequantize", fake)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    out = NF4Linear.dequantize_buffers(q, torch.bfloat16, q.options)
    assert len(calls) == 1 and out.shape == (64, 128) and not out.any()


@pytest.mark.parametrize("out", ["fp32", "bf16", "fp16"])
def test_compiles_for_h100(monkeypatch, out):
    """The interpreter is lenient where the GPU compiler is not: compile for sm_90 down to PTX and ptxas (bundled
    with the wheel; no GPU needed), with the division rounding to nearest as torch's does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET was set when triton was imported: its GPU compiler cannot run in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = triton.jit(triton_nf4._dequantize_kernel)
    constants = dict(BLOCK_SIZE=64, SCALER_BLOCK_SIZE=256, BYTES=triton_nf4.BYTES_PER_PROGRAM)
    signature = dict(packed_ptr="*u8", absmax_ptr="*i8", factor_ptr="*fp32", mean_ptr="*fp32", levels_ptr="*fp32",
                     out_ptr=f"*{out}", num_bytes="i32", numel="i32") | dict.fromkeys(constants, "constexpr")
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm and "div.rn.f32" in compiled.asm["ptx"]


def test_odd_block_size_is_refused():
    q = nf4_layer(64, 128)
    levels, _ = _tables(q.weight.device)
    with pytest.raises(ValueError, match="even"):
        triton_nf4.dequantize(q.weight, q.weight_absmax, q.weight_absmax_factor, q.weight_absmax_mean, levels,
                              64 * 128, torch.float32, 63, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_equals_the_cpu_path():
    q = nf4_layer(256, 520)
    want = NF4Linear.dequantize_buffers(q, torch.bfloat16, q.options)
    got = NF4Linear.dequantize_buffers(q.to("cuda"), torch.bfloat16, q.options)
    assert torch.equal(got.cpu(), want)
