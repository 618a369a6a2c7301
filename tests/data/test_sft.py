"""Instruction data: format detection, loss masks, truncation by whole turns, mixing, deterministic batches, and
packing that computes exactly what each example computes alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from camelid.config import PRESETS
from camelid.data.sft import (Example, SFTBatches, SFTData, SFTDataError, Stats, collate_packed, detect_format,
                              encode_conversation, load_conversations, load_sft, parse_data_spec, to_messages)
from camelid.model import Transformer
from camelid.templates import IGNORE_INDEX, for_tokenizer, get_template
from camelid.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
DATA = FIXTURES / "data"
SPECIALS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
CHATML = get_template("chatml")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. user assistant system\n" * 50
                                       + "question answer capital France Paris Italy Rome 0123456789\n" * 50)
    return Tokenizer.train([folder / "corpus.txt"], vocab_size=350, special_tokens=SPECIALS, show_progress=False)


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _fixture(name: str) -> Path:
    if not (DATA / name).is_file():
        pytest.skip(f"fixture {name} absent")
    return DATA / name


def _conv(n_turns: int, answer: str = "Paris.") -> list[dict]:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{answer} {i}"}]
    return msgs


def _answers(tok: Tokenizer, e: Example) -> list[str]:
    """The trained text of an example, one string per run of trained labels."""
    runs, cur = [], []
    for x in [*e.labels, IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


# ---- formats ----------------------------------------------------------------------------------------------------

def test_parse_data_spec():
    assert parse_data_spec("a.json") == ("a.json", 1.0)
    assert parse_data_spec("dir/a.json:0.25") == ("dir/a.json", 0.25)
    assert parse_data_spec("C:/data/a.json") == ("C:/data/a.json", 1.0)  # a ':' that is not a ratio
    assert parse_data_spec("C:/data/a.json:3") == ("C:/data/a.json", 3.0)
    for bad in ("a.json:0", "a.json:-1", "a.json:inf"):
        with pytest.raises(SFTDataError, match="ratio"):
            parse_data_spec(bad)


def test_alpaca_with_system_and_history():
    rec = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "math", "history": [["hi", "hello"]]}
    assert detect_format(rec) == "alpaca"
    assert to_messages(rec, "alpaca") == [
        {"role": "system", "content": "math"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n2 and 2"},
        {"role": "assistant", "content": "4"}]


def test_sharegpt_roles_and_tools():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "function_call", "value": "{\"name\": \"f\"}"},
                             {"from": "observation", "value": "{\"r\": 1}"}, {"from": "gpt", "value": "a"}],
           "tools": "[{\"name\": \"f\"}]"}
    msgs = to_messages(rec, detect_format(rec))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[0]["content"].startswith("S\n\n") and "[{\"name\": \"f\"}]" in msgs[0]["content"]


def test_real_files_are_detected():
    expected = {"alpaca_en_demo.json": "alpaca", "alpaca_zh_demo.json": "alpaca",
                "glaive_toolcall_en_demo.json": "sharegpt", "kto_en_demo.json": "messages"}
    for name, fmt in expected.items():
        found, convs = load_conversations(_fixture(name))
        assert found == fmt and len(convs) >= 299
        assert all(c[-1]["role"] == "assistant" for c in convs)
    _, glaive = load_conversations(DATA / "glaive_toolcall_en_demo.json")
    roles = {m["role"] for c in glaive for m in c}
    assert roles == {"system", "user", "assistant", "tool"}  # system = the tools list


def test_record_that_fits_no_format_is_named(tmp_path):
    path = _write(tmp_path / "bad.json", [{"instruction": "a", "output": "b"}] * 2 + [{"prompt": "x"}])
    with pytest.raises(SFTDataError, match=r"bad.json: record 2 does not fit alpaca.*prompt"):
        load_conversations(path)
    path = _write(tmp_path / "odd.json", [{"foo": 1}])
    with pytest.raises(SFTDataError, match=r"odd.json: record 0 does not fit alpaca .*sharegpt.*messages"):
        load_conversations(path)
    path = _write(tmp_path / "role.json", [{"messages": [{"role": "user", "content": "q"}]},
                                           {"messages": [{"role": "robot", "content": "q"}]}])
    with pytest.raises(SFTDataError, match=r"role.json: record 1 \(messages\): messages\[0\]: role"):
        load_conversations(path)
    jsonl = tmp_path / "ok.jsonl"
    jsonl.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}) for _ in range(3)))
    assert load_conversations(jsonl)[0] == "messages"


def test_unreadable_files_are_named(tmp_path):
    record = json.dumps({"instruction": "a", "output": "b"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text(f"{record}\n\n{record}\n{{bad\n{record}\n")
    with pytest.raises(SFTDataError, match=r"broken.jsonl: line 4 is not valid JSON"):  # the file's line, not 1
        load_conversations(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(SFTDataError, match=r"latin.json: not UTF-8 text"):
        load_conversations(latin)
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name: `datasets` reads it, so do we
    lines.write_text(f"{record}\n{record}\n")
    assert load_conversations(lines)[0] == "alpaca" and len(load_conversations(lines)[1]) == 2
    bom = tmp_path / "bom.json"  # as Windows tools write it
    bom.write_bytes(b"\xef\xbb\xbf" + f"[{record}]".encode())
    assert load_conversations(bom) == ("alpaca", [[{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]])


def test_a_record_the_template_refuses_is_named(tmp_path, tok):
    from camelid.templates import from_jinja

    no_system = from_jinja("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                           "{% endif %}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    qa = {"instruction": "question", "output": "answer"}
    path = _write(tmp_path / "sys.json", [qa, {**qa, "system": "be brief"}])
    with pytest.raises(SFTDataError, match=r"sys.json: record 1: .*System role not supported"):
        load_sft(str(path), tok, no_system, seq_len=64)


# ---- masks and truncation -------------------------------------------------------------------------------------------

def test_loss_only_on_answers_by_default(tok):
    example, what = encode_conversation(CHATML, tok, _conv(2), seq_len=256)
    assert what == "kept"
    assert _answers(tok, example) == ["Paris. 0<|im_end|>", "Paris. 1<|im_end|>"]
    # labels are the next tokens: input_ids[t + 1] wherever trained
    ids, _ = CHATML.encode_for_training(tok, _conv(2))
    # inputs stop at the last target: the "\n" after the last <|im_end|> is never predicted
    assert example.input_ids == ids[:-2] and tok.decode(ids[-2:], skip_special_tokens=False) == "<|im_end|>\n"
    assert all(x == IGNORE_INDEX or x == ids[t + 1] for t, x in enumerate(example.labels))
    every, _ = encode_conversation(CHATML, tok, _conv(2), seq_len=256, train_on_all=True)
    assert every.labels == ids[1:] and every.input_ids == ids[:-1]


def test_truncation_drops_whole_turns_and_counts(tok):
    full, _ = encode_conversation(CHATML, tok, _conv(4), seq_len=10_000)
    one, _ = encode_conversation(CHATML, tok, _conv(1), seq_len=10_000)
    seq_len = len(full) - 1  # one token too few for all four turns
    oldest, what = encode_conversation(CHATML, tok, _conv(4), seq_len)
    assert what == "truncated" and len(oldest) <= seq_len
    assert _answers(tok, oldest) == [f"Paris. {i}<|im_end|>" for i in (1, 2, 3)]  # the oldest turn went
    assert tok.decode(oldest.input_ids).startswith("system\nbe brief")  # the system prompt stays
    newest, _ = encode_conversation(CHATML, tok, _conv(4), seq_len, truncation="newest")
    assert _answers(tok, newest) == [f"Paris. {i}<|im_end|>" for i in (0, 1, 2)]
    assert encode_conversation(CHATML, tok, _conv(4), seq_len, truncation="drop") == (None, "too_long")
    # a turn that never fits is not cut: the record is dropped
    assert encode_conversation(CHATML, tok, _conv(4), len(one) - 2) == (None, "too_long")
    no_answer = [{"role": "user", "content": "q"}]
    assert encode_conversation(CHATML, tok, no_answer, 100) == (None, "no_answer")


def test_dataset_counts_and_no_usable_record(tmp_path, tok):
    long = "the quick brown fox " * 40
    recs = [{"messages": _conv(1)[1:]}, {"messages": _conv(3)[1:]}, {"messages": _conv(1, answer=long)[1:]},
            {"messages": [{"role": "user", "content": "q"}]}]
    path = _write(tmp_path / "mix.json", recs)
    short = len(encode_conversation(CHATML, tok, _conv(1)[1:], 10_000)[0])
    data = load_sft(str(path), tok, CHATML, seq_len=short + 2)
    assert (data.stats.records, data.stats.kept, data.stats.truncated) == (4, 2, 1)
    assert (data.stats.dropped_too_long, data.stats.dropped_no_answer) == (1, 1)
    assert "1 dropped as too long" in str(data.stats)
    with pytest.raises(SFTDataError, match=r"mix.json: no usable record for seq_len 3"):
        load_sft(str(path), tok, CHATML, seq_len=3)


# ---- batches ----------------------------------------------------------------------------------------------------

def _dataset(name: str, n: int, ratio: float = 1.0, start: int = 0, length: int = 5) -> SFTData:
    # token ids encode (dataset, index), so a test can tell where a row came from
    examples = [Example([start + i] * (length + i % 3), [start + i] * (length + i % 3)) for i in range(n)]
    return SFTData(name, ratio, "messages", examples, Stats(n, n))


def test_batches_are_deterministic_padded_and_split_over_ranks():
    src = SFTBatches([_dataset("a", 50)], seq_len=16, micro_batch=4, pad_id=0, seed=3)
    b = src.batch(7, 0)
    assert torch.equal(b["input_ids"], src.batch(7, 0)["input_ids"])
    assert not torch.equal(b["input_ids"], src.batch(8, 0)["input_ids"])
    assert not torch.equal(b["input_ids"], src.batch(7, 1)["input_ids"])
    assert b["input_ids"].shape == (4, 8)  # padded to a multiple of 8
    lengths = b["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):  # right padding: labels -100 there, mask 0
        assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
        assert (b["labels"][row, n:] == IGNORE_INDEX).all() and (b["input_ids"][row, n:] == 0).all()
    # two ranks of micro_batch 2 see the rows one rank of micro_batch 4 sees
    two = SFTBatches([_dataset("a", 50)], seq_len=16, micro_batch=2, pad_id=0, seed=3)
    both = [two.batch(7, 0, rank, 2)["input_ids"][:, 0] for rank in (0, 1)]
    assert torch.equal(torch.cat(both), b["input_ids"][:, 0])



@pytest.mark.parametrize("pack", [False, True])
def test_a_steps_examples_do_not_depend_on_how_the_global_batch_is_split(pack):
    """micro_batch x grad_accum x ranks = 8 rows per step, split 8 x 1 x 1, 4 x 2 x 1, 2 x 2 x 2 or 1 x 8 x 1: the
    same rows, so --resume (or --auto on another device) may change the split without changing the data."""
    def rows(micro_batch, grad_accum, world):
        src = SFTBatches([_dataset("a", 50, length=4)], seq_len=16, micro_batch=micro_batch, pack=pack, pad_id=0,
                         seed=3)
        ids = [src.batch(5, m, r, world)["input_ids"] for m in range(grad_accum) for r in range(world)]
        return sorted(tuple(row[row != 0].tolist()) for batch in ids for row in batch)

    assert rows(8, 1, 1) == rows(4, 2, 1) == rows(2, 2, 2) == rows(1, 8, 1)

def test_mixing_follows_ratios_and_eval_is_held_out():
    a, b = _dataset("a", 40, ratio=3.0, start=0), _dataset("b", 40, ratio=1.0, start=100)
    src = SFTBatches([a, b], seq_len=16, micro_batch=8, seed=0, eval_fraction=0.1)
    firsts = torch.cat([src.batch(s, 0)["input_ids"][:, 0] for s in range(100)])
    share = (firsts < 100).float().mean().item()
    assert 0.7 < share < 0.8
    held = {e.input_ids[0] for e in src.eval_examples()}
    assert len(held) == 8 and held.isdisjoint(set(firsts.tolist()))  # 4 per dataset, never trained on
    evals = list(src.eval_batches())
    assert sum(len(x["input_ids"]) for x in evals) == 8
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(evals, src.eval_batches()))


def test_packing_layout():
    src = SFTBatches([_dataset("a", 30, length=4)], seq_len=16, micro_batch=2, pack=True, seed=1)
    b = src.batch(0, 0)
    B, T = b["input_ids"].shape
    assert b["attention_mask"].shape == (B, 1, T, T) and b["attention_mask"].dtype == torch.bool
    for row in range(B):
        ids, pos, mask = b["input_ids"][row], b["position_ids"][row], b["attention_mask"][row, 0]
        starts = (pos == 0).nonzero().flatten().tolist()
        assert len(starts) >= 3  # several documents share the row
        for s, e in zip(starts, [*starts[1:], T]):
            assert pos[s:e].tolist() == list(range(e - s))
            if e < T or ids[s] != 0:
                assert len(set(ids[s:e].tolist())) == 1  # one document, never split
            block = mask[s:e, s:e]
            assert torch.equal(block, torch.ones_like(block).tril())
            assert not mask[s:e, :s].any()  # no attention to earlier documents
    assert torch.equal(b["attention_mask"], src.batch(0, 0)["attention_mask"])


def test_packing_gives_the_same_loss_as_each_example_alone():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"]).eval()
    V = PRESETS["tiny"].vocab_size
    examples = []
    for n in (5, 9, 3, 12):
        ids = torch.randint(0, V, (n,)).tolist()
        labels = [IGNORE_INDEX if i < 2 else x for i, x in enumerate(torch.randint(0, V, (n,)).tolist())]
        examples.append(Example(ids, labels))
    packed = collate_packed([examples], pad_id=0, seq_len=32)
    with torch.no_grad():
        logits = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"])
        ce = F.cross_entropy(logits[0].float(), packed["labels"][0], ignore_index=IGNORE_INDEX, reduction="none")
        t = 0
        for e in examples:
            alone = model(torch.tensor([e.input_ids]))
            ce_alone = F.cross_entropy(alone[0].float(), torch.tensor(e.labels), ignore_index=IGNORE_INDEX,
                                       reduction="none")
            torch.testing.assert_close(ce[t:t + len(e)], ce_alone, atol=1e-5, rtol=0)
            t += len(e)
    assert t < packed["input_ids"].shape[1]  # the row has tail padding too, and it changed nothing


def test_real_data_end_to_end(tmp_path):
    tok_dir = FIXTURES / "tokenizers" / "llama3"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("llama3 tokenizer fixture absent")
    tok = Tokenizer(tok_dir)
    specs = [f"{_fixture('alpaca_en_demo.json')}:2", str(_fixture("glaive_toolcall_en_demo.json")),
             f"{_fixture('kto_en_demo.json')}:0.5"]
    src = SFTBatches.from_files(specs, tok, "llama3", seq_len=512, micro_batch=4, pack=True, eval_fraction=0.01)
    report = src.report()
    assert "alpaca_en_demo.json (alpaca, ratio 2)" in report and "glaive_toolcall_en_demo.json (sharegpt" in report
    b = src.batch(0, 0)
    assert b["input_ids"].shape[1] <= 512 and (b["labels"] != IGNORE_INDEX).any()
    eot = tok.token_to_id("<|eot_id|>")
    trained = b["labels"][b["labels"] != IGNORE_INDEX]
    assert (trained == eot).any()  # every answer ends with the end-of-turn token
    glaive = next(d for d in src.datasets if "glaive" in d.path)
    # function calls are trained (assistant), tool results are not
    tool_turn = "<|start_header_id|>ipython<|end_header_id|>\n\n"
    e = next(e for e in glaive.examples if tool_turn in tok.decode(e.input_ids, skip_special_tokens=False))
    result = tok.decode(e.input_ids, skip_special_tokens=False).split(tool_turn)[1].split("<|eot_id|>")[0]
    trained = "".join(_answers(tok, e))
    assert '"name"' in trained and result not in trained
    assert next(iter(src.eval_batches()))["input_ids"].shape[0] <= 4
    # the tokenizer's own template (this copy has one) works as the template too
    ours = load_sft(str(_fixture("alpaca_zh_demo.json")), tok, get_template("llama3"), seq_len=1024)
    theirs = load_sft(str(_fixture("alpaca_zh_demo.json")), tok, for_tokenizer(tok), seq_len=1024)
    assert ours.stats.kept == theirs.stats.kept > 990
    for a, b in zip(ours.examples, theirs.examples):  # the header the Jinja copy adds at the end is trimmed
        assert a == b
