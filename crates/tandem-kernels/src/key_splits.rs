//! How many runs the CUDA paged-attention kernel splits each work item's keys into
//! (flash-decoding; kernels/paged_attention.cu): a policy on host numbers only, so it is tested
//! on every machine.
//!
//! Without splits the kernel runs one block per (work item, KV head), and a block walks all the
//! keys of its item's sequence tile by tile. Decode at a small batch has few items — one per
//! sequence for GQA groups up to 16 — so Llama-3.1-8B at batch 1 runs 8 blocks on a GPU with 132
//! SMs, each walking the whole context serially. Splitting the keys into S runs gives S times the
//! blocks; a second kernel merges each row's S partial softmax states.

use crate::paged_attention::{PagedAttentionMeta, WorkItem, TILE};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Blocks per SM the policy aims for: a 128-dim block stages 41 KB of shared memory, so an SM
/// holds at most 5 of them; 4 keeps it busy while leaving room for a co-running kernel.
const BLOCKS_PER_SM: usize = 4;
/// The most splits of one item (the merge reads `splits` partial states per row).
pub const MAX_SPLITS: usize = 64;

/// 0: the policy of `key_splits` decides (the default); n > 0: every CUDA paged-attention call
/// uses min(n, the item's tiles) splits (benchmarks compare split and unsplit runs). The CPU
/// path ignores it. Where it is 0, the environment variable TANDEM_ATTENTION_SPLITS (read once)
/// may force a count the same way (`TANDEM_ATTENTION_SPLITS=1`: no splits, on a GPU host).
pub static ATTENTION_SPLITS: AtomicUsize = AtomicUsize::new(0);

fn forced() -> usize {
    static FROM_ENV: OnceLock<usize> = OnceLock::new();
    match ATTENTION_SPLITS.load(Ordering::Relaxed) {
        0 => *FROM_ENV.get_or_init(|| {
            std::env::var("TANDEM_ATTENTION_SPLITS")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        }),
        n => n,
    }
}

/// The largest number of key tiles any item of `items` walks.
pub fn max_tiles(meta: &PagedAttentionMeta, items: &[WorkItem]) -> usize {
    items
        .iter()
        .map(|it| {
            let toks = it.first_token as usize..(it.first_token + it.tokens) as usize;
            let pos = &meta.positions[toks];
            let lo = pos.iter().map(|&p| meta.first_key(p as usize)).min();
            let hi = pos.iter().map(|&p| p as usize).max();
            match (lo, hi) {
                (Some(lo), Some(hi)) => (hi - (lo - lo % TILE)) / TILE + 1,
                _ => 0,
            }
        })
        .max()
        .unwrap_or(0)
}

/// Splits for a launch of `blocks` blocks (work items × KV heads) whose longest item walks
/// `max_tiles` tiles, on a GPU with `sms` multiprocessors: enough to reach `BLOCKS_PER_SM`
/// blocks per SM, at most one per tile and `MAX_SPLITS`; 1 when the launch fills the GPU already.
pub fn key_splits(blocks: usize, max_tiles: usize, sms: usize) -> usize {
    let forced = forced();
    let cap = max_tiles.clamp(1, MAX_SPLITS);
    if forced > 0 {
        return forced.min(cap);
    }
    (BLOCKS_PER_SM * sms).div_ceil(blocks.max(1)).clamp(1, cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged_attention::work_list;

    fn meta(seqs: &[(u32, u32)], window: Option<usize>) -> PagedAttentionMeta {
        let (mut seg, mut pos) = (vec![], vec![]);
        for (s, &(prefix, n)) in seqs.iter().enumerate() {
            for p in prefix..prefix + n {
                seg.push(s as u32);
                pos.push(p);
            }
        }
        let tables = seqs
            .iter()
            .map(|&(p, n)| (0..(p + n).div_ceil(16)).collect())
            .collect();
        PagedAttentionMeta::new(16, seg, pos, tables, window)
    }

    #[test]
    fn tiles_follow_positions_and_windows() {
        // Keys 0..=1023: 32 tiles; keys 0..=31: one; a 100-key window ending at key 1023 starts
        // at 924, in tile 28 (896..): tiles 28..=31.
        let m = meta(&[(1023, 1), (31, 1)], None);
        assert_eq!(max_tiles(&m, &work_list(&m.token_segment, 4)), 32);
        let m = meta(&[(31, 1)], None);
        assert_eq!(max_tiles(&m, &work_list(&m.token_segment, 4)), 1);
        let m = meta(&[(1023, 1)], Some(100));
        assert_eq!(max_tiles(&m, &work_list(&m.token_segment, 4)), 4);
        // A prefill item of 4 tokens at positions 30..=33 walks keys 0..=33: two tiles.
        let m = meta(&[(30, 4)], None);
        assert_eq!(max_tiles(&m, &work_list(&m.token_segment, 4)), 2);
    }

    #[test]
    fn policy() {
        // (The override is 0 here: no test in this crate sets it, nor TANDEM_ATTENTION_SPLITS.)
        // Llama-3.1-8B decode at batch 1 (8 blocks) on 132 SMs: as many splits as tiles.
        assert_eq!(key_splits(8, 32, 132), 32);
        assert_eq!(key_splits(8, 200, 132), MAX_SPLITS);
        // Batch 32 (256 blocks): 528 / 256 -> 3.
        assert_eq!(key_splits(256, 32, 132), 3);
        // A prefill chunk of 1024 tokens (2048 blocks) or one tile of keys: no split.
        assert_eq!(key_splits(2048, 32, 132), 1);
        assert_eq!(key_splits(8, 1, 132), 1);
        assert_eq!(key_splits(0, 0, 132), 1);
    }
}
