//! KV block accounting: which physical blocks each sequence holds. Plain data, no tensors.

use std::collections::HashMap;

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
    tables: HashMap<u64, Vec<u32>>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            // Pop from the end: low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence still needs to hold `num_tokens` tokens.
    pub fn blocks_missing(&self, seq: u64, num_tokens: usize) -> usize {
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        num_tokens.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Grows `seq`'s table to hold `num_tokens` tokens. False (and no change) if blocks run out.
    pub fn allocate(&mut self, seq: u64, num_tokens: usize) -> bool {
        let missing = self.blocks_missing(seq, num_tokens);
        if missing > self.free.len() {
            return false;
        }
        let table = self.tables.entry(seq).or_default();
        for _ in 0..missing {
            // Cannot fail: checked above.
            if let Some(b) = self.free.pop() {
                table.push(b);
            }
        }
        true
    }

    pub fn table(&self, seq: u64) -> &[u32] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Returns all of `seq`'s blocks to the free list.
    pub fn free(&mut self, seq: u64) {
        if let Some(t) = self.tables.remove(&seq) {
            self.free.extend(t.into_iter().rev());
        }
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
}
