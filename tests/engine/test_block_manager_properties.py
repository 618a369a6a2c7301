"""BlockManager under random operations (hypothesis state machine): admit with prefix-cache hits, compute chunks,
decode, fork (n > 1, copy-on-write), preempt, free. A shadow KV cache records what each slot holds (the whole token
prefix its keys/values depend on), so after every operation we check that every sequence reads its own prefix,
that no write lands in a shared or cached block, that reference counts equal the block tables holding each block,
that free + used == total, that a cached hash maps to a block holding that prefix, and that nothing leaks."""

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from camelid.engine.block_manager import BlockManager, block_hash
from camelid.engine.sampling_params import SamplingParams
from camelid.engine.sequence import Sequence

# a 3-token alphabet and 1-4 token blocks: prompts share prefixes (and whole blocks) often
tokens = st.lists(st.integers(0, 2), min_size=1, max_size=14)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]), adapters=st.booleans())
    def setup(self, num_blocks, block_size, adapters):
        self.bm = BlockManager(num_blocks, block_size)
        self.bs = block_size
        self.adapter_keys = [None, "sql#0"] if adapters else [None]
        self.seqs: list[Sequence] = []
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> (adapter, prefix) its keys/values encode
        self.next_id = 0

    def new_seq(self, token_ids: list[int], adapter_key: str | None) -> Sequence:
        self.next_id += 1
        return Sequence(self.next_id, str(self.next_id), 0, token_ids, SamplingParams(), adapter_key=adapter_key)

    def prefix(self, seq: Sequence, p: int) -> tuple:
        return seq.adapter_key, tuple(seq.token_ids[:p + 1])

    def write(self, seq: Sequence, n: int) -> None:
        """The forward of n tokens: each lands in its slot, which must belong to this sequence alone."""
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = self.bm.blocks[seq.block_table[p // self.bs]]
            assert block.ref_count == 1, f"write into shared block {block}"
            assert block.hash is None, f"write into cached block {block}"
            self.slots[block.block_id, p % self.bs] = self.prefix(seq, p)

    def reserve(self, seq: Sequence, n: int) -> bool:
        before = (list(seq.block_table), [b.ref_count for b in self.bm.blocks], self.bm.num_free_blocks)
        copies = self.bm.reserve(seq, n)
        if copies is None:  # refused: nothing changed
            assert before == (seq.block_table, [b.ref_count for b in self.bm.blocks], self.bm.num_free_blocks)
            return False
        for src, dst in copies:
            for offset in range(self.bs):
                if (src, offset) in self.slots:
                    self.slots[dst, offset] = self.slots[src, offset]
        return True

    def pick(self, data, pred=lambda s: True) -> Sequence | None:
        live = [s for s in self.seqs if pred(s)]
        return data.draw(st.sampled_from(live)) if live else None

    # ---- operations -------------------------------------------------------------------------------------------

    @rule(token_ids=tokens, data=st.data())
    def admit(self, token_ids, data):
        seq = self.new_seq(token_ids, data.draw(st.sampled_from(self.adapter_keys)))
        hit = self.bm.allocate_cached_prefix(seq)
        assert hit % self.bs == 0 and hit < len(seq) and seq.num_computed_tokens == hit
        self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data):
        seq = self.pick(data, lambda s: s.num_uncomputed_tokens > 0)
        if seq is None:
            return
        n = data.draw(st.integers(1, seq.num_uncomputed_tokens))
        if self.reserve(seq, n):
            self.write(seq, n)
            seq.num_computed_tokens += n
            self.bm.register_full_blocks(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        seq = self.pick(data, lambda s: s.num_uncomputed_tokens == 0)
        if seq is not None:
            seq.append(token)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        """As the scheduler forks: the parent reserves the rest of its prompt, the child shares every block and counts
        those tokens as computed, then the parent's forward writes them."""
        parent = self.pick(data)
        n = parent.num_uncomputed_tokens
        if n and not self.reserve(parent, n):
            return
        child = self.new_seq(parent.token_ids, parent.adapter_key)
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens + n
        self.write_shared(parent, n)
        parent.num_computed_tokens += n
        self.bm.register_full_blocks(parent)
        self.seqs.append(child)

    def write_shared(self, parent: Sequence, n: int) -> None:
        # the parent's last chunk is written after the fork, into blocks the child already shares (the same tokens)
        for p in range(parent.num_computed_tokens, parent.num_computed_tokens + n):
            block = self.bm.blocks[parent.block_table[p // self.bs]]
            assert block.hash is None
            self.slots[block.block_id, p % self.bs] = self.prefix(parent, p)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def preempt(self, data):
        seq = self.pick(data)
        self.bm.free(seq)
        self.bm.allocate_cached_prefix(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        seq = self.pick(data)
        self.bm.free(seq)
        self.seqs.remove(seq)

    # ---- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def reference_counts_and_free_lists(self):
        holders = [0] * self.bm.num_blocks
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                holders[b] += 1
        assert [b.ref_count for b in self.bm.blocks] == holders
        free, evictable = list(self.bm.free_ids), list(self.bm.evictable)
        assert sorted(free + evictable) == [b for b, count in enumerate(holders) if count == 0]
        assert self.bm.num_free_blocks + sum(count > 0 for count in holders) == self.bm.num_blocks
        assert all(self.bm.cached.get(self.bm.blocks[b].hash) == b for b in evictable)

    @invariant()
    def cached_hashes_map_to_their_prefix(self):
        for h, b in self.bm.cached.items():
            block = self.bm.blocks[b]
            assert block.hash == h and len(block.token_ids) == self.bs
            adapter, prefix = self.slots[b, self.bs - 1]
            assert prefix[-self.bs:] == block.token_ids
            parent = None
            for i in range(0, len(prefix), self.bs):
                parent = block_hash(parent, prefix[i:i + self.bs], adapter)
            assert parent == h

    @invariant()
    def every_sequence_reads_its_own_prefix(self):
        for seq in self.seqs:
            assert len(seq.block_table) >= self.bm.blocks_needed(seq.num_computed_tokens)
            assert seq.num_hashed_blocks <= seq.num_computed_tokens // self.bs
            for p in range(seq.num_computed_tokens):
                assert self.slots.get((seq.block_table[p // self.bs], p % self.bs)) == self.prefix(seq, p), (seq, p)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.seqs:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                                 derandomize=True, database=None,
                                                 suppress_health_check=[HealthCheck.too_slow])
test_block_manager_invariants = BlockManagerMachine.TestCase
