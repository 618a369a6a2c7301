"""Generation: greedy ids identical to transformers' generate, the cache-free oracle, stop tokens, the context limit,
StopStrings, and the text API (generate / stream) with a real byte-level BPE tokenizer."""

import time

import pytest
import torch

from camelid.generate import StopStrings, generate, generate_ids, iter_tokens, stream
from camelid.model import Transformer
from camelid.quant import quantize_model
from camelid.sampling import Sampling
from camelid.tokenizer import Tokenizer
from model_zoo import ARCH_CONFIGS, FIXTURES, random_model, tiny_config

NEW = 32
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 99], [17, 42, 8, 64, 120]]


def hf_generate(hf, prompts: list[list[int]], **kw) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch; returns the new tokens of each row."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                      pad_token_id=0, **kw)
    return out[:, longest:].tolist()


# ---- greedy ids vs transformers ----------------------------------------------------------------------------------

def test_greedy_single_prompt_matches_transformers(pair):
    hf, model = pair
    for prompt in PROMPTS:
        ours = generate_ids(model, [prompt], NEW)
        assert ours == hf_generate(hf, [prompt])
        assert len(ours[0]) == NEW and len(set(ours[0])) > 2  # a real sequence, not one token repeated


def test_greedy_padded_batch_matches_transformers(pair):
    hf, model = pair
    ours = generate_ids(model, PROMPTS, NEW)
    assert ours == hf_generate(hf, PROMPTS)
    assert ours == [generate_ids(model, [p], NEW)[0] for p in PROMPTS]  # padding changes nothing


@pytest.mark.parametrize("arch", ["llama", "mixtral"], indirect=True)
def test_repetition_penalty_matches_transformers(pair):
    hf, model = pair
    for prompt in PROMPTS[:2]:
        assert generate_ids(model, [prompt], NEW, repetition_penalty=1.3) == hf_generate(hf, [prompt],
                                                                                        repetition_penalty=1.3)


# ---- against a cache-free oracle (every architecture, including the non-HF ones) -------------------------------

@torch.no_grad()
def naive_greedy(model: Transformer, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Recompute the whole padded batch every step: no cache, obviously right."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    for _ in range(new):
        nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, longest:].tolist()


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_greedy_matches_cache_free_oracle(name):
    model = random_model(tiny_config(**ARCH_CONFIGS[name]))
    assert generate_ids(model, PROMPTS, 16) == naive_greedy(model, PROMPTS, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_lm_head_matches_cache_free_oracle(dtype):
    """A quantized lm_head holds int8 codes; the KV cache still takes the hidden states' dtype."""
    model = quantize_model(random_model(tiny_config()).to(dtype), "int8", modules=r".*(proj|lm_head)")
    assert model.lm_head.weight.dtype == torch.int8
    assert generate_ids(model, PROMPTS, 16) == naive_greedy(model, PROMPTS, 16)


@pytest.fixture(scope="module")
def llama() -> Transformer:
    return random_model(tiny_config())


def test_stop_ids_end_each_row(llama):
    free = generate_ids(llama, PROMPTS, 16)
    stop = free[0][3]  # row 0 stops after its 4th token (or sooner if that token came earlier)
    got = generate_ids(llama, PROMPTS, 16, stop_ids=[stop])
    for row, tokens in zip(got, free):
        expected = tokens[:tokens.index(stop) + 1] if stop in tokens else tokens
        assert row == expected


def test_iter_tokens_marks_finished_rows(llama):
    free = generate_ids(llama, PROMPTS[:2], 8)
    stop = free[0][1]
    steps = list(iter_tokens(llama, PROMPTS[:2], 8, Sampling(), stop_ids=[stop]))
    assert steps[1][0] == stop
    assert all(step[0] is None for step in steps[2:])


def test_context_length_caps_generation(llama):
    context = llama.config.max_position_embeddings
    assert len(generate_ids(llama, [[3] * (context - 5)], 100)[0]) == 5
    with pytest.raises(ValueError, match="context"):
        generate_ids(llama, [[3] * context], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(llama, [[3], []], 4)
    with pytest.raises(ValueError, match="no prompts"):
        generate_ids(llama, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(llama, [[3]], 0)


def test_seeded_generation_is_reproducible(llama):
    a = generate_ids(llama, PROMPTS, 16, temperature=1.0, seed=0)
    assert a == generate_ids(llama, PROMPTS, 16, temperature=1.0, seed=0)
    assert a != generate_ids(llama, PROMPTS, 16, temperature=1.0, seed=1)
    assert generate_ids(llama, PROMPTS, 16, temperature=1.0, top_k=1, seed=5) == generate_ids(llama, PROMPTS, 16)


# ---- StopStrings -------------------------------------------------------------------------------------------------

def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], str, bool]:
    s = StopStrings(stops)
    shown = [s.feed(p) for p in pieces]
    return shown, s.flush(), s.stopped


def test_stop_strings_pass_through_without_stops():
    assert feed_all([], ["a", "b<", "c"]) == (["a", "b<", "c"], "", False)
    assert feed_all([""], ["a", "b"]) == (["a", "b"], "", False)  # empty stop strings are ignored
    assert feed_all(None, ["a", "b"]) == (["a", "b"], "", False)  # None = no stop strings, as SamplingParams takes it


def test_stop_strings_hold_back_partial_matches():
    shown, tail, stopped = feed_all(["</s>"], ["abc<", "/", "x", "yz"])
    assert shown == ["abc", "", "</x", "yz"] and tail == "" and not stopped


def test_stop_string_split_across_pieces():
    shown, tail, stopped = feed_all(["</s>"], ["hel", "lo</", "s", ">more", "after"])
    assert shown == ["hel", "lo", "", "", ""] and tail == "" and stopped


def test_stop_strings_cut_at_the_earliest():
    shown, _, stopped = feed_all(["world", "lo w"], ["hello world"])
    assert shown == ["hel"] and stopped
    shown, _, _ = feed_all(["b", "abc"], ["xa", "bc"])  # both complete in the same piece: "abc" starts first
    assert "".join(shown) == "x"


def chunkings(text: str):
    """Every way to split `text` into non-empty pieces, in order."""
    if not text:
        yield []
        return
    for i in range(1, len(text) + 1):
        for rest in chunkings(text[i:]):
            yield [text[:i], *rest]


@pytest.mark.parametrize("stops, text", [(["ab", "b"], "xxabzz"), (["abc", "bc"], "xabcd"), (["b", "abc"], "xabcd"),
                                         (["b", "abc"], "xabd"), (["bc", "abcd"], "abce"), (["aa", "ab"], "xaab"),
                                         (["b", "abc"], "xab")])
def test_stop_strings_cut_at_the_earliest_whatever_the_chunking(stops, text):
    # OpenAI: the text ends just before the earliest occurrence of any stop string in the full text
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    for pieces in chunkings(text):
        shown, tail, stopped = feed_all(stops, pieces)
        assert "".join(shown) + tail == text[:first], pieces
        assert stopped == (first < len(text)), pieces


def test_a_long_stop_string_costs_what_the_held_text_is_long():
    # a request may send stop strings of a megabyte: each piece must not try every one of its prefixes (that took
    # seconds per token on the engine thread, for every user)
    s, start = StopStrings(["x" * 1_000_000]), time.perf_counter()
    assert [s.feed(p) for p in ["ab", "cx", "xd"]] == ["ab", "c", "xxd"]
    assert time.perf_counter() - start < 1.0


def test_stop_strings_flush_returns_held_text():
    shown, tail, stopped = feed_all(["STOP"], ["go ST", "O"])
    assert shown == ["go ", ""] and tail == "STO" and not stopped


def test_stop_string_inside_one_piece_with_text_after():
    assert feed_all(["\n\n"], ["one\n", "\ntwo"]) == (["one", ""], "", True)


def test_one_stop_string_is_not_split_into_characters():
    # OpenAI and SamplingParams take `stop="STOP"` as one string; iterating it would stop at any "S", "T", ...
    assert feed_all("STOP", ["Stay", " STOP"]) == (["Stay", " "], "", True)


# ---- text API ----------------------------------------------------------------------------------------------------

TEXT = """The quick brown fox jumps over the lazy dog. A camel walks across the desert, slowly, slowly.
Llamas and alpacas live in the mountains; they eat grass and hum softly to each other.
Numbers: 1 2 3 4 5 6 7 8 9 10. Punctuation: (brackets), [lists], {sets}, "quotes" and 'apostrophes'.
"""


@pytest.fixture(scope="module", params=["bpe", "llama3"])
def text_model(request, tmp_path_factory):
    """(tiny random model, tokenizer) with matching vocab size and special ids."""
    if request.param == "bpe":
        corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
        corpus.write_text(TEXT * 20)
        tok = Tokenizer.train([corpus], vocab_size=320, show_progress=False)
    else:
        folder = FIXTURES / "tokenizers" / "llama3"
        if not folder.is_dir():
            pytest.skip(f"fixture missing: {folder}")
        tok = Tokenizer(folder)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     max_position_embeddings=128))
    return model, tok


def test_stream_equals_generate_equals_decoded_ids(text_model):
    model, tok = text_model
    prompt = "The quick brown"
    text = generate(model, tok, prompt, max_new_tokens=24)
    assert "".join(stream(model, tok, prompt, max_new_tokens=24)) == text
    ids = generate_ids(model, [tok.encode(prompt)], 24, stop_ids=set(tok.stop_ids) | {tok.eos_id})[0]
    ids = [i for i in ids if i not in tok.stop_ids]
    assert text == tok.decode(ids)
    assert len(text) > 0


def test_batched_generate_equals_one_by_one(text_model):
    model, tok = text_model
    prompts = ["Llamas and", "A camel walks across the", "1 2"]
    assert generate(model, tok, prompts, max_new_tokens=12) == [generate(model, tok, p, max_new_tokens=12)
                                                                 for p in prompts]
    assert generate(model, tok, [], max_new_tokens=12) == []  # as LLM.generate([])


class CountCalls:
    """Count forward passes; optionally force one token to win from a given call on."""

    def __init__(self, model: Transformer, force: int | None = None, from_call: int = 0):
        self.calls, self.force, self.from_call = 0, force, from_call
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, logits):
        self.calls += 1
        if self.force is not None and self.calls > self.from_call:
            logits = logits.clone()
            logits[..., self.force] = 1e4
            return logits
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_stop_string_ends_generation(text_model):
    model, tok = text_model
    prompt = "Numbers:"
    with CountCalls(model) as free_run:
        full = generate(model, tok, prompt, max_new_tokens=30)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    with CountCalls(model) as stopped_run:
        assert generate(model, tok, prompt, max_new_tokens=30, stop=[stop]) == expected
    assert "".join(stream(model, tok, prompt, max_new_tokens=30, stop=[stop])) == expected
    assert stopped_run.calls < free_run.calls  # it stopped decoding, not just trimmed the text
    assert generate(model, tok, prompt, max_new_tokens=30, stop=["\x00never"]) == full
    assert generate(model, tok, prompt, max_new_tokens=30, stop="\x00never") == full


@pytest.mark.parametrize("after", [0, 3])
def test_eos_ends_generation(text_model, after):
    """Force EOS to win after `after` tokens: the text is those tokens, EOS itself is not shown, decoding stops."""
    model, tok = text_model
    prompt = "A camel"
    ids = generate_ids(model, [tok.encode(prompt)], 10)[0]
    with CountCalls(model, force=tok.eos_id, from_call=after) as run:
        text = generate(model, tok, prompt, max_new_tokens=10)
    assert run.calls == after + 1
    assert text == tok.decode(ids[:after])
    with CountCalls(model, force=tok.eos_id, from_call=after):
        assert "".join(stream(model, tok, prompt, max_new_tokens=10)) == text


def test_seeded_text_generation(text_model):
    model, tok = text_model
    a = generate(model, tok, "The", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == generate(model, tok, "The", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, "The", top_p=2.0)
