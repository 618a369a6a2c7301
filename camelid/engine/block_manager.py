"""BlockManager: who owns which KV-cache block. Reference counts, a free list, prefix caching and copy-on-write.

- A block is shared by every sequence whose block table lists it; it returns to the pool when its count drops to 0.
- Prefix caching: once a block is full and its keys/values are computed, it is keyed by a hash of the whole token
  prefix up to its end (the parent block's hash chained with this block's tokens, rooted at the LoRA adapter, since an
  adapter changes the keys). A new sequence whose prompt starts with the same tokens takes those blocks instead of
  recomputing them. Unreferenced cached blocks stay in the pool, in LRU order, and are only evicted (their hash
  forgotten) when a block is needed and no never-used block is left. They count as free.
- Copy-on-write: the n completions of one prompt share its blocks; a partially filled last block is copied before a
  sequence writes into it while another still references it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from camelid.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and computed
        self.token_ids: tuple[int, ...] = ()  # the block's tokens, checked on a hash hit (no false sharing)

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hashed={self.hash is not None})"


def block_hash(parent: int | None, token_ids: tuple[int, ...], root: str | None = None) -> int:
    """The key of a full block: its tokens chained to the hash of everything before it."""
    return hash((parent if parent is not None else ("root", root), token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # unreferenced and holding no cached prefix
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recently used first
        self.cached: dict[int, int] = {}  # prefix hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------------------------

    def _take_free(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:  # evict the least recently used cached block
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                self.evictable[block_id] = None  # keep its contents for a later prefix hit
            else:
                block.hash, block.token_ids = None, ()
                self.free_ids.append(block_id)

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the cached blocks matching its leading tokens; return how many
        tokens they cover (now counted as computed). The last token is always left to compute: its logits are
        needed, and that keeps every shared block read-only."""
        assert not seq.block_table, "prefix lookup is for a sequence that holds no blocks"
        if not self.enable_prefix_caching or seq.scores_prompt:  # scoring needs the logits of every prompt token
            return 0
        bs, parent = self.block_size, None
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens, seq.adapter_key)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            if self.blocks[block_id].ref_count == 0:
                del self.evictable[block_id]
            self.blocks[block_id].ref_count += 1
            seq.block_table.append(block_id)
            parent = h
        hit = len(seq.block_table) * bs
        seq.num_computed_tokens = seq.num_cached_tokens = hit
        seq.num_hashed_blocks = len(seq.block_table)
        return hit

    def reserve(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Make room for the sequence's next `num_new_tokens` tokens: new blocks, and a private copy of a shared
        partially filled block it is about to write into. Returns the (src, dst) block copies to do before the
        forward, or None, changing nothing, when there are not enough free blocks."""
        start = seq.num_computed_tokens
        grow = self.blocks_needed(start + num_new_tokens) - len(seq.block_table)
        first = start // self.block_size  # the block the first new token goes into
        shared = first < len(seq.block_table) and self.blocks[seq.block_table[first]].ref_count > 1
        if max(grow, 0) + shared > self.num_free_blocks:
            return None
        copies = []
        if shared:
            src = seq.block_table[first]
            dst = self._take_free()
            self.blocks[src].ref_count -= 1  # still referenced by the others, so never 0 here
            seq.block_table[first] = dst
            copies.append((src, dst))
        for _ in range(grow):
            seq.block_table.append(self._take_free())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (n > 1: one prompt, n completions)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens, child.num_hashed_blocks = parent.num_computed_tokens, parent.num_hashed_blocks

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; it will recompute from scratch (or from the prefix cache) if it runs again.
        The tail is released first so that LRU eviction takes the deepest blocks of a prefix before its root."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    # ---- prefix caching -------------------------------------------------------------------------------------

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed (full and computed) blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            if block.hash is None:
                block.hash, block.token_ids = block_hash(parent, tokens, seq.adapter_key), tokens
                self.cached.setdefault(block.hash, block.block_id)  # a twin computed first stays the cached one
        seq.num_hashed_blocks = seq.num_computed_tokens // bs
