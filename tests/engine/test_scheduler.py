"""Scheduler without a model: the token budget, decodes before prefills, chunked prefill, preemption of the newest
sequence when blocks run out (and its recompute), stop conditions, and that finishing frees the blocks."""

import pytest

from camelid.engine.block_manager import BlockManager
from camelid.engine.sampling_params import SamplingParams
from camelid.engine.scheduler import Scheduler
from camelid.engine.sequence import Sequence, Status

BS = 4
EOS = 2


def make_scheduler(num_blocks: int = 64, budget: int = 32, max_num_seqs: int = 16, max_model_len: int = 64,
                   prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), max_num_seqs, budget, max_model_len, {EOS})


def add(s: Scheduler, prompt_len: int, seq_id: int, max_tokens: int = 8, **params) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, [10 + seq_id] * prompt_len,
                   SamplingParams(max_tokens=max_tokens, temperature=0, **params), arrival=seq_id)
    s.add(seq)
    return seq


def add_n(s: Scheduler, n: int, prompt_len: int, request: int, max_tokens: int = 4) -> list[Sequence]:
    """A request of n completions as LLM.add_request builds it: the first sequence carries the others as forks."""
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0)
    seqs = [Sequence(100 * request + i, str(request), i, [10 + request] * prompt_len, params, arrival=request)
            for i in range(n)]
    seqs[0].forks = seqs[1:]
    s.add(seqs[0])
    return seqs


def unfinished(s: Scheduler) -> bool:
    return bool(s.waiting or s.running)


def step(s: Scheduler, token: int = 7):
    batch = s.schedule()
    s.postprocess(batch, [token] * len(batch.samples))
    return batch


def test_decodes_come_first_then_prefill_chunks_fill_the_budget():
    s = make_scheduler(budget=10)
    a = add(s, 6, 0)
    batch = step(s)
    assert batch.num_new_tokens == [6] and len(a.output_token_ids) == 1
    b, c = add(s, 8, 1), add(s, 8, 2)
    batch = step(s)
    # a decodes (1 token), then b's whole prompt (8), then 1 token of c: exactly the budget
    assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 8, 1] and batch.num_tokens == 10
    assert [seq for seq, _ in batch.samples] == [a, b]  # c's chunk does not reach its last token: no sample
    assert c.num_computed_tokens == 1 and c.output_token_ids == []
    batch = step(s)
    assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 1, 7]
    assert c.num_output_tokens == 1


def test_chunked_prefill_of_a_long_prompt():
    s = make_scheduler(budget=5)
    seq = add(s, 12, 0)
    chunks = [step(s).num_new_tokens for _ in range(3)]
    assert chunks == [[5], [5], [2]]
    assert seq.num_computed_tokens == 12 and seq.output_token_ids == [7]


def test_max_num_seqs_limits_admission():
    s = make_scheduler(max_num_seqs=2)
    seqs = [add(s, 3, i) for i in range(3)]
    step(s)
    assert seqs[2].status == Status.WAITING and len(s.running) == 2


@pytest.mark.parametrize("budget", [64, 4])  # 4: prompts prefill in chunks while their forks wait to branch off
def test_max_num_seqs_counts_the_forks_of_n_requests(budget):
    """Invariant: after every step, running sequences (forks included, and those a running parent will branch off
    once its prompt is computed) are at most max_num_seqs, and so are the tokens sampled in one step."""
    s = make_scheduler(max_num_seqs=3, budget=budget)
    requests = [add_n(s, 2, 6, 0), add_n(s, 3, 5, 1), add_n(s, 1, 3, 2), add_n(s, 3, 9, 3), add_n(s, 1, 2, 4)]
    most = 0
    while unfinished(s):
        batch = step(s)
        assert len(s.running) <= s.num_seqs() <= 3 and len(batch.samples) <= 3
        most = max(most, s.num_seqs())
    assert most == 3  # the limit is reached, not just respected
    assert all(seq.num_output_tokens == 4 for seqs in requests for seq in seqs)
    assert s.block_manager.num_free_blocks == 64


def test_a_request_of_more_completions_than_max_num_seqs_is_refused():
    s = make_scheduler(max_num_seqs=2)
    with pytest.raises(ValueError, match="n=3 completions exceed max_num_seqs=2"):
        add_n(s, 3, 4, 0)
    assert not unfinished(s)


def test_preempts_the_newest_when_blocks_run_out_and_recomputes_it():
    s = make_scheduler(num_blocks=3, budget=64)
    old, new = add(s, 4, 0, max_tokens=6), add(s, 3, 1, max_tokens=6)
    step(s)  # prompts: one block each
    assert s.block_manager.num_free_blocks == 1
    step(s)  # old's token at position 4 takes the last block; new's position 3 still fits its first
    assert s.num_preemptions == 0 and s.block_manager.num_free_blocks == 0
    step(s)  # new's position 4 needs a block and none is left: the newest (new itself) is preempted
    assert s.num_preemptions == 1
    assert new.status == Status.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert old.status == Status.RUNNING and old.num_output_tokens == 3
    assert new.num_output_tokens == 2  # generated tokens survive; their keys/values are recomputed
    while unfinished(s):
        step(s)
    assert old.num_output_tokens == 6 and new.num_output_tokens == 6
    assert s.block_manager.num_free_blocks == 3


def test_an_older_sequence_takes_the_blocks_of_the_newest():
    s = make_scheduler(num_blocks=2, budget=64)
    old, new = add(s, 4, 0), add(s, 2, 1)
    step(s)
    assert s.block_manager.num_free_blocks == 0
    batch = step(s)  # old's position 4 needs a second block: new is preempted to free one
    assert s.num_preemptions == 1 and batch.seqs == [old] and len(old.block_table) == 2
    assert new.status == Status.WAITING and s.waiting[0] is new


def test_a_sequence_alone_preempts_itself_rather_than_deadlock():
    s = make_scheduler(num_blocks=2, budget=64)
    a, b = add(s, 4, 0, max_tokens=4), add(s, 4, 1, max_tokens=4)
    for _ in range(40):
        if not unfinished(s):
            break
        step(s)
    assert not unfinished(s) and s.num_preemptions > 0
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4


def test_no_admission_in_a_step_that_preempted():
    s = make_scheduler(num_blocks=3, budget=64)
    add(s, 4, 0, max_tokens=8)
    add(s, 3, 1, max_tokens=8)
    step(s)
    step(s)
    batch = step(s)
    assert s.num_preemptions == 1
    assert all(seq.seq_id != 1 for seq in batch.seqs)  # the victim is not readmitted in the same step


def test_stop_token_and_max_tokens_and_context_end_sequences():
    s = make_scheduler(max_model_len=8)
    by_eos, by_stop_id, by_length, by_context = add(s, 2, 0), add(s, 2, 1, stop_token_ids=[9]), add(s, 2, 2, 3), \
        add(s, 5, 3, 100)
    batch = s.schedule()
    s.postprocess(batch, [EOS, 9, 7, 7])
    assert by_eos.finish_reason == "stop" and by_stop_id.finish_reason == "stop"
    assert by_eos.output_token_ids == [EOS]  # the stop token is kept in the ids
    while unfinished(s):
        step(s)
    assert by_length.finish_reason == "length" and by_length.num_output_tokens == 3
    assert by_context.finish_reason == "length" and len(by_context) == 8
    assert s.block_manager.num_free_blocks == 64


def test_ignore_eos():
    s = make_scheduler()
    seq = add(s, 2, 0, max_tokens=3, ignore_eos=True)
    while unfinished(s):
        step(s, token=EOS)
    assert seq.output_token_ids == [EOS] * 3 and seq.finish_reason == "length"


def test_finish_frees_blocks_at_once():
    s = make_scheduler(num_blocks=8)
    running, waiting = add(s, 9, 0), add(s, 9, 1)
    s.max_num_seqs = 1
    step(s)
    assert s.block_manager.num_free_blocks == 5
    s.finish(running, "abort")
    s.finish(waiting, "abort")
    assert s.block_manager.num_free_blocks == 8 and not unfinished(s)
    assert running.finish_reason == "abort" and waiting.status == Status.FINISHED


def test_forked_siblings_share_the_prompt_and_sample_from_its_logits():
    s = make_scheduler()
    parent = add(s, 6, 0, max_tokens=2)
    children = [Sequence(10 + i, "0", i, parent.token_ids, parent.params, arrival=0) for i in (1, 2)]
    parent.forks = children
    batch = s.schedule()
    assert batch.seqs == [parent] and [(seq, i) for seq, i in batch.samples] == [(parent, 0), (children[0], 0),
                                                                                 (children[1], 0)]
    assert all(c.block_table == parent.block_table for c in children)
    s.postprocess(batch, [7, 8, 9])
    assert [q.output_token_ids for q in [parent, *children]] == [[7], [8], [9]]
    batch = step(s)
    assert len(batch.copies) == 2  # the shared partial block: two writers copy, the last one writes in place
    assert not unfinished(s) and s.block_manager.num_free_blocks == 64


@pytest.mark.parametrize("bad", [dict(max_num_seqs=0), dict(budget=0)])
def test_bad_limits(bad):
    with pytest.raises(ValueError):
        make_scheduler(**bad)
