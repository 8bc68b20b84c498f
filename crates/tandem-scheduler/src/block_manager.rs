//! KV block accounting: which physical blocks each sequence holds, and automatic prefix caching
//! (vLLM v1's design). Plain data, no tensors.
//!
//! A full block that a sequence has computed is identified by a hash chained from the previous
//! block's hash over the block's tokens; the chain starts from the sequence's extra key (its
//! adapter, the adapter's weight version, the request's cache salt), so blocks are shared only
//! between sequences whose K/V would be the same. Blocks are reference counted: a block can be
//! held by many sequences at once (it is full and never written again). A block whose last holder
//! goes stays cached in an LRU free queue; allocation takes never-cached free blocks first, then
//! evicts the least recently freed cached block. Blocks held outside sequences' prompts (e.g. a
//! finetuning job's) are never hashed.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// A block's identity in the cache: 128 bits of a SHA-256 chain.
pub type BlockHash = u128;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    refs: u32,
    hash: Option<BlockHash>,
    /// Position in `free_cached` while it sits there.
    tick: u64,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    table: Vec<u32>,
    /// Leading blocks whose hashes are known (registered or hit), and the last of those hashes.
    hashed: usize,
    last_hash: Option<BlockHash>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    meta: Vec<Meta>,
    /// Free blocks that hold nothing cached (taken first), low ids last.
    free_plain: Vec<u32>,
    /// Free blocks that hold cached K/V, least recently freed first.
    free_cached: BTreeMap<u64, u32>,
    tick: u64,
    /// Hash -> the block that holds it.
    cached: HashMap<BlockHash, u32>,
    seqs: HashMap<u64, SeqBlocks>,
    /// Cached blocks taken for new content since start.
    pub evictions: u64,
}

/// The chain's first link: the sequence's extra key.
pub fn extra_key(adapter: Option<(u32, u64)>, salt: Option<&str>) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"tandem-prefix-v1");
    match adapter {
        Some((id, version)) => {
            h.update([1]);
            h.update(id.to_le_bytes());
            h.update(version.to_le_bytes());
        }
        None => h.update([0]),
    }
    match salt {
        Some(s) => {
            h.update([1]);
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        None => h.update([0]),
    }
    truncate(h)
}

fn truncate(h: Sha256) -> BlockHash {
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

fn chain(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    truncate(h)
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            meta: vec![Meta::default(); num_blocks],
            // Pop from the end: low ids first.
            free_plain: (0..num_blocks as u32).rev().collect(),
            free_cached: BTreeMap::new(),
            tick: 0,
            cached: HashMap::new(),
            seqs: HashMap::new(),
            evictions: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks that an allocation can take (free ones, cached or not).
    pub fn num_free(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    /// Free blocks that still hold cached K/V.
    pub fn num_cached_free(&self) -> usize {
        self.free_cached.len()
    }

    /// Blocks a sequence still needs to hold `num_tokens` tokens.
    pub fn blocks_missing(&self, seq: u64, num_tokens: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.table.len());
        num_tokens.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Takes one free block for new content (evicting the least recently freed cached block when
    /// no plain one is left).
    fn take_free(&mut self) -> Option<u32> {
        let b = match self.free_plain.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.free_cached.pop_first()?;
                self.evictions += 1;
                if let Some(h) = self.meta[b as usize].hash.take() {
                    if self.cached.get(&h) == Some(&b) {
                        self.cached.remove(&h);
                    }
                }
                b
            }
        };
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// Grows `seq`'s table to hold `num_tokens` tokens. False (and no change) if blocks run out.
    pub fn allocate(&mut self, seq: u64, num_tokens: usize) -> bool {
        let missing = self.blocks_missing(seq, num_tokens);
        if missing > self.num_free() {
            return false;
        }
        let mut new = Vec::with_capacity(missing);
        for _ in 0..missing {
            // Cannot fail: checked above.
            if let Some(b) = self.take_free() {
                new.push(b);
            }
        }
        self.seqs.entry(seq).or_default().table.extend(new);
        true
    }

    /// For a sequence that holds no blocks yet: the longest run of leading full blocks of
    /// `tokens` that the cache holds under `key`, leaving at least one token to compute (its
    /// logits are needed). The sequence takes a reference on them; returns how many tokens
    /// they hold.
    pub fn take_cached_prefix(&mut self, seq: u64, tokens: &[u32], key: BlockHash) -> usize {
        if self.seqs.get(&seq).is_some_and(|s| !s.table.is_empty()) || tokens.is_empty() {
            return 0;
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent = key;
        let mut hit = Vec::new();
        for i in 0..max_blocks {
            let h = chain(
                parent,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            let Some(&b) = self.cached.get(&h) else {
                break;
            };
            hit.push(b);
            parent = h;
        }
        for &b in &hit {
            let m = &mut self.meta[b as usize];
            if m.refs == 0 {
                self.free_cached.remove(&m.tick);
            }
            m.refs += 1;
        }
        let n = hit.len();
        let s = self.seqs.entry(seq).or_default();
        s.table = hit;
        s.hashed = n;
        s.last_hash = (n > 0).then_some(parent);
        n * self.block_size
    }

    /// Registers `seq`'s full blocks among its first `computed` tokens of `tokens` in the cache
    /// under `key` (the same key its chain started with).
    pub fn commit(&mut self, seq: u64, tokens: &[u32], computed: usize, key: BlockHash) {
        let bs = self.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let full = (computed.min(tokens.len()) / bs).min(s.table.len());
        while s.hashed < full {
            let i = s.hashed;
            let h = chain(s.last_hash.unwrap_or(key), &tokens[i * bs..(i + 1) * bs]);
            let b = s.table[i];
            // A block already cached under this hash elsewhere stays; this one is left plain.
            if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
                e.insert(b);
                self.meta[b as usize].hash = Some(h);
            }
            s.hashed += 1;
            s.last_hash = Some(h);
        }
    }

    pub fn table(&self, seq: u64) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| s.table.as_slice())
    }

    /// Drops `seq`'s references. A block nobody holds goes back to the free blocks: cached ones
    /// to the end of the LRU queue (a sequence's last block first, so that it is evicted
    /// before the prefix it extends), others to the plain free list.
    pub fn free(&mut self, seq: u64) {
        let Some(s) = self.seqs.remove(&seq) else {
            return;
        };
        for b in s.table.into_iter().rev() {
            let m = &mut self.meta[b as usize];
            m.refs = m.refs.saturating_sub(1);
            if m.refs > 0 {
                continue;
            }
            if m.hash.is_some() {
                self.tick += 1;
                m.tick = self.tick;
                self.free_cached.insert(self.tick, b);
            } else {
                self.free_plain.push(b);
            }
        }
    }

    /// Forgets every cached block (e.g. when caching is switched off at run time).
    pub fn clear_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.free_cached) {
            self.meta[b as usize].hash = None;
            self.free_plain.push(b);
        }
        for m in &mut self.meta {
            m.hash = None;
        }
        self.cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grow_and_free() {
        let mut m = BlockManager::new(4, 16);
        assert!(m.allocate(1, 17));
        assert_eq!(m.table(1).len(), 2);
        assert!(m.allocate(1, 32));
        assert_eq!(m.table(1).len(), 2);
        assert!(m.allocate(2, 20));
        assert!(!m.allocate(2, 40), "only 0 blocks left");
        assert_eq!(m.table(2).len(), 2);
        assert_eq!(m.num_free(), 0);
        m.free(1);
        assert_eq!(m.num_free(), 2);
        assert!(m.allocate(2, 64));
        let mut all: Vec<u32> = m.table(2).to_vec();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn shared_prefixes_are_reference_counted_and_cached_after_free() {
        let key = extra_key(None, None);
        let mut m = BlockManager::new(8, 4);
        let a = toks(10, 0);
        assert_eq!(m.take_cached_prefix(1, &a, key), 0);
        assert!(m.allocate(1, 10));
        m.commit(1, &a, 10, key); // two full blocks registered
                                  // The same prompt: two blocks hit, held by both.
        assert_eq!(m.take_cached_prefix(2, &a, key), 8);
        assert_eq!(m.table(2), &m.table(1)[..2]);
        // A prompt that is exactly two blocks leaves its last token to compute: one block.
        assert_eq!(m.take_cached_prefix(3, &a[..8], key), 4);
        // Another key (adapter, version or salt) shares nothing.
        let other = extra_key(Some((1, 0)), None);
        assert_eq!(m.take_cached_prefix(4, &a, other), 0);
        assert_ne!(other, extra_key(Some((1, 1)), None));
        assert_ne!(extra_key(None, Some("a")), extra_key(None, Some("b")));
        // A different first block breaks the chain even if the second matches.
        let mut b = a.clone();
        b[0] += 1;
        assert_eq!(m.take_cached_prefix(5, &b, key), 0);
        m.free(1);
        m.free(2);
        m.free(3);
        m.free(4);
        m.free(5);
        assert_eq!(m.num_free(), 8);
        assert_eq!(m.num_cached_free(), 2);
        // Freed, still cached: a later sequence hits it.
        assert_eq!(m.take_cached_prefix(6, &a, key), 8);
        assert_eq!(m.num_cached_free(), 0);
        m.free(6);
    }

    #[test]
    fn allocation_takes_plain_blocks_first_then_evicts_the_least_recently_freed() {
        let key = extra_key(None, None);
        let mut m = BlockManager::new(4, 2);
        let (a, b) = (toks(3, 0), toks(3, 1)); // one full block each
        for (id, t) in [(1, &a), (2, &b)] {
            assert!(m.allocate(id, 3));
            m.commit(id, t, 3, key);
        }
        m.free(1); // a's blocks freed first: its cached block is the LRU one
        m.free(2);
        assert_eq!(m.num_cached_free(), 2);
        assert!(m.allocate(3, 4)); // two plain blocks, nothing evicted
        assert_eq!(m.num_cached_free(), 2);
        assert!(m.allocate(3, 6)); // one more: a's block goes
        assert_eq!(m.take_cached_prefix(4, &a, key), 0);
        assert_eq!(m.take_cached_prefix(5, &b, key), 2);
        assert!(
            !m.allocate(6, 2),
            "b's block is held, the others by sequence 3"
        );
    }
}
