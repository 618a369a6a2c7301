"""The `interpreter` fixture: Triton kernels run on CPU tensors through Triton's interpreter, for the tests of
camelid's kernels (tests/engine/test_triton_decode.py and test_triton_prefill.py, tests/quant/test_triton_nf4.py,
tests/train/test_triton_ce.py). Import it into a test module with `from triton_interpreter import interpreter` (the
module needs triton: importorskip it first)."""

import numpy as np
import pytest
import triton


@pytest.fixture
def interpreter(monkeypatch):
    """Run kernels on CPU tensors through Triton's interpreter, for the tests that ask: setting TRITON_INTERPRET=1 at
    import would leak into every later test of the session (anything checking triton_decode.available() would see
    True on CPU). triton_decode wraps its kernel with triton.jit on first call, when Triton reads the variable."""
    from triton.runtime import interpreter as interp
    from triton.runtime.jit import JITFunction

    language = [triton.language, triton.language.core, triton.language.math, triton.language.standard]
    before = [dict(vars(module)) for module in language]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Triton's own helpers (tl.sum, tl.max, tl.cdiv) were wrapped for the GPU compiler if triton was imported before
    # this fixture (here, or by another module: torchao imports triton): interpret those calls too. Either way, patch
    # the language for a helper's module during its call only (Triton 3.6 leaves those patches behind).
    interpreted = {}  # by id: hashing a JITFunction walks its source, which fails while the interpreter runs

    def call_interpreted(self, *args, **kwargs):
        if not isinstance(self, interp.InterpretedFunction):
            if id(self) not in interpreted:
                interpreted[id(self)] = interp.InterpretedFunction(self.fn)
            self = interpreted[id(self)]
        scope = interp._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    monkeypatch.setattr(JITFunction, "__call__", call_interpreted)
    monkeypatch.setattr(interp.InterpretedFunction, "__call__", call_interpreted)
    # Triton 3.6's interpreter calls int() on 1-element arrays for runtime loop bounds, which numpy >= 2.4 rejects
    # (triton-lang/triton#9171, fixed upstream by #9172): apply the same fix for the duration of the test.
    original = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_lang_tensor)
    # The interpreter multiplies bf16 dot operands as their raw uint16 bits: widen them to fp32 first (exact), which
    # is what the GPU's bf16 x bf16 -> fp32 tensor-core dot computes.
    original_dot = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != triton.language.bfloat16:
                return x
            return interp.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), triton.language.float32)

        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)
    yield
    # The GPU compiler runs on the same triton.language: the interpreter must leave none of its patches behind.
    monkeypatch.undo()
    for module, attrs in zip(language, before):
        changed = [name for name, value in vars(module).items() if attrs.get(name, value) is not value]
        assert not changed, f"interpreter patches left on {module.__name__}: {changed[:5]}"
