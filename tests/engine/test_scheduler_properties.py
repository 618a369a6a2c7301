"""Scheduler under random traffic (hypothesis), with a stub model: requests (n > 1 included) arrive at random steps,
some are aborted, the KV budget is tiny (preemption), the token budget small (chunked prefill). The stub's forward
writes each token's whole prefix into a shadow cache and checks that every sampling sequence reads its own prefix
there; its "sampler" is a fixed function of (tokens, completion index). So each completion must equal the same
function run alone, whatever the batching, preemption and prefix caching did. Every step respects the token budget
and max_num_seqs and schedules decodes before prefills; every request ends within a bound; no block leaks."""

from hypothesis import HealthCheck, event, given, settings, strategies as st

from camelid.engine.block_manager import BlockManager
from camelid.engine.sampling_params import SamplingParams
from camelid.engine.scheduler import Scheduler
from camelid.engine.sequence import Sequence, Status

EOS = 4
STOP_ID = 3


def next_token(token_ids: list[int], index: int) -> int:
    """The stub model + sampler: deterministic in the prefix, different per completion (as seeded sampling is)."""
    return hash((tuple(token_ids), index)) % 6  # 0..5: EOS and STOP_ID come up now and then


def alone(prompt: list[int], index: int, params: SamplingParams, max_model_len: int) -> tuple[list[int], str]:
    """One completion run by itself: the oracle."""
    tokens = list(prompt)
    while True:
        token = next_token(tokens, index)
        tokens.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token == EOS):
            return tokens[len(prompt):], "stop"
        if len(tokens) - len(prompt) >= params.max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):], "length"


class StubModel:
    """Checks what the forward would read, writes what it would write, and samples next_token."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> the prefix its keys/values encode

    def slot(self, seq: Sequence, p: int) -> tuple[int, int]:
        return seq.block_table[p // self.bs], p % self.bs

    def step(self, s: Scheduler) -> list[int]:
        batch = s.schedule()
        for src, dst in batch.copies:
            for offset in range(self.bs):
                if (src, offset) in self.slots:
                    self.slots[dst, offset] = self.slots[src, offset]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for p in range(seq.num_computed_tokens):  # the context it attends to
                assert self.slots.get(self.slot(seq, p)) == tuple(seq.token_ids[:p + 1]), (seq, p)
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                assert s.block_manager.blocks[self.slot(seq, p)[0]].hash is None, "write into a cached block"
                self.slots[self.slot(seq, p)] = tuple(seq.token_ids[:p + 1])
        tokens = [next_token(batch.seqs[i].token_ids, seq.index) for seq, i in batch.samples]
        s.postprocess(batch, tokens)
        return batch


request = st.fixed_dictionaries({
    "shared": st.integers(0, 8),  # how much of the common stem the prompt starts with: prefix-cache hits
    "tail": st.lists(st.integers(0, 2), min_size=1, max_size=6),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 8),
    "stop": st.booleans(),
    "ignore_eos": st.booleans(),
    "arrives": st.integers(0, 6),  # the step it arrives at
    "aborted_at": st.none() | st.integers(0, 30),  # the step it is aborted at, if still running
})


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(stem=st.lists(st.integers(0, 2), min_size=8, max_size=8), num_blocks=st.integers(2, 10),
       block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 12), max_num_seqs=st.integers(1, 4),
       prefix_caching=st.booleans(), requests=st.lists(request, min_size=2, max_size=6))
def test_random_traffic(stem, num_blocks, block_size, budget, max_num_seqs, prefix_caching, requests):
    max_model_len = min(24, num_blocks * block_size)  # as LLM: a sequence never outgrows the cache
    for r in requests:
        r["prompt"] = stem[:r["shared"]] + r["tail"]
    requests = [r for r in requests if len(r["prompt"]) < max_model_len and r["n"] <= max_num_seqs]
    last_arrival = max((r["arrives"] for r in requests), default=0)
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    s = Scheduler(bm, max_num_seqs, budget, max_model_len, {EOS})
    model = StubModel(block_size)
    seqs: dict[int, list[Sequence]] = {}
    bound = 50 + 10 * sum(r["n"] * (len(r["prompt"]) + r["max_tokens"]) for r in requests)
    for step in range(bound):
        for k, r in enumerate(requests):
            if r["arrives"] == step:
                params = SamplingParams(n=r["n"], max_tokens=r["max_tokens"], temperature=0, ignore_eos=r["ignore_eos"],
                                        stop_token_ids=[STOP_ID] if r["stop"] else [])
                seqs[k] = [Sequence(100 * k + i, str(k), i, r["prompt"], params, arrival=step * 10 + k)
                           for i in range(r["n"])]
                seqs[k][0].forks = seqs[k][1:]
                s.add(seqs[k][0])
            if r["aborted_at"] == step and k in seqs:
                for seq in seqs[k]:  # as LLM.abort
                    s.finish(seq, "abort")
        if step > last_arrival and not (s.waiting or s.running):
            break
        decodes = {id(q) for q in s.running if q.num_uncomputed_tokens == 1}
        preemptions = s.num_preemptions
        batch = model.step(s)
        assert batch.num_tokens <= budget and all(n >= 1 for n in batch.num_new_tokens)
        kinds = [id(q) in decodes for q in batch.seqs]
        assert kinds == sorted(kinds, reverse=True), "a prefill was scheduled before a decode"
        left_out = [q for q in s.running if id(q) in decodes and q not in batch.seqs]
        if left_out and s.num_preemptions == preemptions:  # a decode was skipped: only for lack of budget
            assert batch.num_tokens == budget
        assert s.num_seqs() <= max_num_seqs and len(batch.samples) <= max_num_seqs
        assert all(q.status == Status.RUNNING for q in s.running) and all(q.status == Status.WAITING
                                                                         for q in s.waiting)
    else:
        raise AssertionError(f"requests still unfinished after {bound} steps: {s.waiting} {s.running}")

    event(f"preempted: {s.num_preemptions > 0}, prefix hit: {s.prefix_cache_hit_tokens > 0}")
    assert bm.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    for k, r in enumerate(requests):
        for seq in seqs[k]:
            assert seq.is_finished
            if seq.finish_reason != "abort":
                expected = alone(r["prompt"], seq.index, seq.params, max_model_len)
                assert (seq.output_token_ids, seq.finish_reason) == expected, (k, seq.index)
