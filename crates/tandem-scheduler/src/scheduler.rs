//! The scheduler: decides which sequences run in an iteration and how many tokens each, under a
//! token budget, and builds the plain `ScheduledBatch` the engine executes.
//!
//! No prefill or decode phases: every sequence catches its computed tokens up to its length
//! (vLLM v1). Client requests go first (running, then waiting), then engine-made background
//! sequences (a reinforcement job's sampled answers), which join a batch that holds client
//! requests only as far as the engine's TPOT check allows. When KV blocks run out, the most
//! recently admitted running sequence is preempted, a background one first (recompute: its
//! blocks are freed and it re-enters the front of its kind in the waiting queue).
//!
//! Prefix caching: a sequence scheduled for the first time (or again after preemption) takes
//! the cached KV blocks of its longest cached prefix under its key (adapter and weight version,
//! cache salt) and counts those tokens as computed, so they cost nothing in the token budget;
//! after each iteration its newly full blocks enter the cache, unless its adapter's weights
//! changed since it started (an optimizer step of a co-served job), whose K/V then mix versions.

use crate::block_manager::{extra_key, BlockManager};
use crate::cost_model::SegmentCost;
use crate::sequence::Sequence;
use std::collections::{HashMap, VecDeque};
use tandem_model::{LogitsWanted, NewSequence, PackedBatch, ScheduledBatch};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_model_len: usize,
    /// Distinct LoRA adapters among live sequences (the engine's resident slots).
    pub max_loras: usize,
    /// Automatic prefix caching (vLLM's `--enable-prefix-caching`).
    pub enable_prefix_caching: bool,
}

#[derive(Debug)]
pub struct Scheduler {
    pub cfg: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    blocks: BlockManager,
    /// Sequences that left since the last batch (their samplers can go).
    gone: Vec<u64>,
    /// (sequence id, tokens) scheduled in the last batch.
    last: Vec<(u64, usize)>,
    /// Preemptions since start.
    pub num_preemptions: u64,
    /// Weight version per adapter id (bumped when a live adapter's weights change).
    adapter_versions: HashMap<u32, u64>,
    /// Prompt tokens looked up in the prefix cache, and those found (vLLM's
    /// prefix_cache_queries / prefix_cache_hits).
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
}

/// Why a sequence cannot be admitted at all.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("the prompt has {prompt} tokens; with max_tokens {max_tokens} it needs {needed}, the context window is {limit}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        needed: usize,
        limit: usize,
    },
    #[error("the prompt is empty")]
    Empty,
    #[error("no adapter named `{0}` is loaded")]
    UnknownAdapter(String),
    #[error("the sequence needs {needed} KV blocks, the cache has {total}")]
    CacheTooSmall { needed: usize, total: usize },
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let blocks = BlockManager::new(cfg.num_blocks, cfg.block_size);
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            gone: Vec::new(),
            last: Vec::new(),
            num_preemptions: 0,
            adapter_versions: HashMap::new(),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    /// Records that adapter `id`'s weights changed (an optimizer step): K/V computed before must
    /// not serve requests after, and sequences computed partly under the old weights stop adding
    /// blocks to the cache.
    pub fn adapter_weights_changed(&mut self, id: u32) {
        *self.adapter_versions.entry(id).or_default() += 1;
    }

    fn adapter_version(&self, adapter: Option<u32>) -> u64 {
        adapter.map_or(0, |a| self.adapter_versions.get(&a).copied().unwrap_or(0))
    }

    /// For a sequence about to run from nothing computed: takes its cached prefix.
    fn take_cached_prefix(&mut self, seq: &mut Sequence) {
        if !self.cfg.enable_prefix_caching || seq.num_computed > 0 {
            return;
        }
        let version = self.adapter_version(seq.adapter);
        let key = extra_key(seq.adapter.map(|a| (a, version)), seq.cache_salt.as_deref());
        let hit = self.blocks.take_cached_prefix(seq.id, &seq.tokens, key);
        seq.num_computed = hit;
        seq.cache_key = Some((key, version));
        if seq.num_preemptions == 0 {
            seq.cached_tokens = hit;
            self.prefix_cache_queries += seq.tokens.len() as u64;
            self.prefix_cache_hits += hit as u64;
        }
    }

    /// Queues a sequence, or says why it can never run.
    pub fn add(&mut self, seq: Sequence) -> Result<(), AdmitError> {
        if seq.tokens.is_empty() {
            return Err(AdmitError::Empty);
        }
        if seq.tokens.len() >= self.cfg.max_model_len {
            return Err(AdmitError::TooLong {
                prompt: seq.tokens.len(),
                max_tokens: seq.params.max_tokens,
                needed: seq.tokens.len() + 1,
                limit: self.cfg.max_model_len,
            });
        }
        let needed = (seq.tokens.len() + 1).div_ceil(self.cfg.block_size);
        if needed > self.cfg.num_blocks {
            return Err(AdmitError::CacheTooSmall {
                needed,
                total: self.cfg.num_blocks,
            });
        }
        // A client's request goes ahead of engine-made (background) work still waiting.
        let at = if seq.background {
            self.waiting.len()
        } else {
            self.waiting
                .iter()
                .position(|s| s.background)
                .unwrap_or(self.waiting.len())
        };
        self.waiting.insert(at, seq);
        Ok(())
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// How long the longest-waiting queued client request has waited.
    pub fn longest_wait(&self) -> Option<std::time::Duration> {
        self.waiting
            .iter()
            .filter(|s| !s.background)
            .map(|s| s.arrival.elapsed())
            .max()
    }

    /// KV blocks the next iteration wants beyond the free ones: every running sequence's next
    /// tokens, and the head of the queue's first chunk with the admission headroom.
    pub fn kv_shortfall(&self) -> usize {
        let mut budget = self.cfg.max_batched_tokens;
        let mut need = 0;
        for s in &self.running {
            let n = s.uncomputed().min(budget);
            budget -= n;
            need += self.blocks.blocks_missing(s.id, s.num_computed + n);
        }
        if budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            if let Some(s) = self.waiting.front() {
                let n = s.uncomputed().min(budget);
                need += self.blocks.blocks_missing(s.id, s.num_computed + n) + self.running.len();
            }
        }
        need.saturating_sub(self.blocks.num_free())
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Ids of sequences that left since the last batch (the engine releases their state).
    pub fn take_finished(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.gone)
    }

    /// Distinct adapters of running sequences, and of waiting ones, in first-seen order.
    pub fn adapters_in_use(&self) -> (Vec<u32>, Vec<u32>) {
        let distinct = |it: &mut dyn Iterator<Item = &Sequence>| {
            let mut v: Vec<u32> = Vec::new();
            for a in it.filter_map(|s| s.adapter) {
                if !v.contains(&a) {
                    v.push(a);
                }
            }
            v
        };
        (
            distinct(&mut self.running.iter()),
            distinct(&mut self.waiting.iter()),
        )
    }

    /// Whether any queued or running sequence runs through adapter `id`.
    pub fn uses_adapter(&self, id: u32) -> bool {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .any(|s| s.adapter == Some(id))
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// For KV blocks held outside the scheduler's sequences (finetuning jobs).
    pub fn blocks_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Builds the next iteration's batch, every sequence as it comes.
    pub fn schedule(&mut self) -> ScheduledBatch {
        self.schedule_within(&mut |_| true)
    }

    /// Builds the next iteration's batch. Client requests go first (running, then waiting);
    /// engine-made background sequences (running, then waiting) follow, and while client
    /// requests are in the batch each joins only if `fits` accepts the batch's inference
    /// segments with its own added (the engine's TPOT check). A running background sequence
    /// left out keeps its blocks and goes on in a later iteration; one never takes a client's
    /// place: under KV pressure background sequences are preempted first, and a client
    /// waiting for a free slot (`max_num_seqs`) preempts the newest one.
    pub fn schedule_within(
        &mut self,
        fits: &mut dyn FnMut(&[SegmentCost]) -> bool,
    ) -> ScheduledBatch {
        let mut p = Plan {
            budget: self.cfg.max_batched_tokens,
            ids: Vec::new(),
            segments: Vec::new(),
            clients: 0,
            preempted: false,
        };
        let out = ScheduledBatch {
            finished: std::mem::take(&mut self.gone),
            ..Default::default()
        };
        self.plan_running(&mut p, false, fits);
        self.admit(&mut p, false, fits);
        self.plan_running(&mut p, true, fits);
        self.admit(&mut p, true, fits);
        self.build(out, p.ids)
    }

    /// Plans the running sequences of one kind (client or background) in admission order.
    fn plan_running(
        &mut self,
        p: &mut Plan,
        background: bool,
        fits: &mut dyn FnMut(&[SegmentCost]) -> bool,
    ) {
        let mut i = 0;
        while i < self.running.len() && p.budget > 0 {
            let seq = &self.running[i];
            if seq.background != background || p.ids.iter().any(|&(id, _)| id == seq.id) {
                i += 1;
                continue;
            }
            let n = seq.uncomputed().min(p.budget);
            if background && !p.admits(seq, n, fits) {
                i += 1;
                continue;
            }
            if self.blocks.allocate(seq.id, seq.num_computed + n) {
                p.push(seq, n);
                i += 1;
                continue;
            }
            // Out of blocks: preempt the newest unplanned running sequence, a background one
            // if any; if that is this one, it (and those after it) wait.
            let Some(victim) = self.victim(&p.ids) else {
                break;
            };
            self.preempt(victim);
            p.preempted = true;
            match victim.cmp(&i) {
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Less => i -= 1,
                std::cmp::Ordering::Greater => {}
            }
        }
    }

    /// The newest running sequence not in the plan, background ones first.
    fn victim(&self, planned: &[(u64, usize)]) -> Option<usize> {
        let free = |s: &&Sequence| !planned.iter().any(|&(id, _)| id == s.id);
        let newest = |background: bool| {
            self.running
                .iter()
                .rposition(|s| s.background == background && free(&s))
        };
        newest(true).or_else(|| newest(false))
    }

    /// Admits waiting sequences of one kind while there is room (not in an iteration that had
    /// to preempt for memory). A sequence whose adapter would exceed `max_loras` distinct live
    /// adapters is skipped (it waits for one to drain); memory shortage stops admission (first
    /// come, first served).
    fn admit(
        &mut self,
        p: &mut Plan,
        background: bool,
        fits: &mut dyn FnMut(&[SegmentCost]) -> bool,
    ) {
        if p.preempted {
            return;
        }
        let mut live = self.live_adapters();
        let mut i = 0;
        while p.budget > 0 && i < self.waiting.len() {
            if self.waiting[i].background != background {
                i += 1;
                continue;
            }
            if let Some(a) = self.waiting[i].adapter {
                if !live.contains(&a) && live.len() >= self.cfg.max_loras {
                    i += 1;
                    continue;
                }
            }
            if self.running.len() >= self.cfg.max_num_seqs {
                // A client takes the slot of the newest background sequence not yet planned.
                let slot = self
                    .running
                    .iter()
                    .rposition(|s| s.background && !p.ids.iter().any(|&(id, _)| id == s.id));
                match slot {
                    Some(v) if !background => {
                        self.preempt(v);
                        // The preempted sequence queued after every client: `i` still holds.
                    }
                    _ => break,
                }
            }
            let Some(mut seq) = self.waiting.remove(i) else {
                break;
            };
            self.take_cached_prefix(&mut seq);
            let n = seq.uncomputed().min(p.budget);
            // Keep one block of headroom per running sequence so admission does not cause
            // immediate preemption at the next decode step.
            let missing = self.blocks.blocks_missing(seq.id, seq.num_computed + n);
            let ok = (!background || p.admits(&seq, n, fits))
                && (missing + self.running.len() <= self.blocks.num_free()
                    || self.running.is_empty())
                && self.blocks.allocate(seq.id, seq.num_computed + n);
            if !ok {
                // It waits on; the cached blocks it took go back (still cached).
                self.blocks.free(seq.id);
                seq.num_computed = 0;
                self.waiting.insert(i, seq);
                break;
            }
            live.extend(seq.adapter);
            p.push(&seq, n);
            self.running.push(seq);
        }
    }

    /// The batch of the planned (sequence id, tokens).
    fn build(&mut self, mut out: ScheduledBatch, plan: Vec<(u64, usize)>) -> ScheduledBatch {
        self.last.clear();
        for (id, n) in plan {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            if !seq.announced {
                out.new_seqs.push(NewSequence {
                    seq_id: seq.id,
                    params: seq.params.clone(),
                    adapter: seq.adapter,
                    prompt: if seq.params.repetition_penalty != 1.0 {
                        seq.tokens[..seq.prompt_len].to_vec()
                    } else {
                        Vec::new()
                    },
                });
                seq.announced = true;
            }
            let start = seq.num_computed;
            let logits = if start + n == seq.tokens.len() {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            push_segment(
                &mut out.batch,
                seq,
                start,
                n,
                self.blocks.table(seq.id).to_vec(),
                logits,
            );
            self.last.push((seq.id, n));
        }
        out
    }

    /// Adapters of sequences the engine knows (running, or preempted after being announced).
    fn live_adapters(&self) -> std::collections::HashSet<u32> {
        self.running
            .iter()
            .chain(self.waiting.iter().filter(|s| s.announced))
            .filter_map(|s| s.adapter)
            .collect()
    }

    fn preempt(&mut self, idx: usize) {
        let mut seq = self.running.remove(idx);
        self.blocks.free(seq.id);
        seq.num_computed = 0;
        seq.cache_key = None;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        tracing::debug!(
            seq = seq.id,
            tokens = seq.tokens.len(),
            "preempted (recompute)"
        );
        // Back at the front of its kind: clients before every background sequence.
        let at = if seq.background {
            self.waiting
                .iter()
                .position(|s| s.background)
                .unwrap_or(self.waiting.len())
        } else {
            0
        };
        self.waiting.insert(at, seq);
    }

    /// Records the last batch as computed and appends sampled tokens.
    pub fn update(&mut self, sampled: &[(u64, u32)]) {
        for (id, n) in std::mem::take(&mut self.last) {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            seq.num_computed += n;
            if let Some((key, version)) = seq.cache_key {
                let now = seq
                    .adapter
                    .map_or(0, |a| self.adapter_versions.get(&a).copied().unwrap_or(0));
                if now == version {
                    self.blocks
                        .commit(seq.id, &seq.tokens, seq.num_computed, key);
                } else {
                    seq.cache_key = None;
                }
            }
        }
        let now = std::time::Instant::now();
        for &(id, tok) in sampled {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
                seq.tokens.push(tok);
                seq.first_token.get_or_insert(now);
            }
        }
    }

    /// How long the next iteration may take with every running client request still at or under
    /// `tpot` on average over its output so far (its time per output token counted from its
    /// first token): the least slack among them. None when no running request has a token yet.
    pub fn latency_budget(&self, tpot: std::time::Duration) -> Option<std::time::Duration> {
        self.running
            .iter()
            .filter(|s| !s.background)
            .filter_map(|s| {
                let first = s.first_token?;
                // After the next token, the request has this many gaps since its first.
                let gaps = (s.tokens.len() - s.prompt_len) as u32;
                Some((tpot * gaps).saturating_sub(first.elapsed()))
            })
            .min()
    }

    /// Removes a sequence (finished or aborted) and frees its blocks.
    pub fn finish(&mut self, id: u64) -> Option<Sequence> {
        self.blocks.free(id);
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)
        };
        if seq.as_ref().is_some_and(|s| s.announced) {
            self.gone.push(id);
        }
        seq
    }
}

fn push_segment(
    batch: &mut PackedBatch,
    seq: &Sequence,
    start: usize,
    n: usize,
    table: Vec<u32>,
    logits: LogitsWanted,
) {
    batch.push_with_adapter(
        seq.id,
        &seq.tokens[start..start + n],
        start,
        table,
        logits,
        seq.adapter,
    );
}

/// An iteration's plan as it is built: what is left of the token budget, the planned
/// (sequence id, tokens) and their segments' costs, and how many are client requests.
struct Plan {
    budget: usize,
    ids: Vec<(u64, usize)>,
    segments: Vec<SegmentCost>,
    clients: usize,
    preempted: bool,
}

impl Plan {
    fn segment(seq: &Sequence, n: usize) -> SegmentCost {
        SegmentCost {
            start: seq.num_computed,
            len: n,
            logits: usize::from(seq.num_computed + n == seq.tokens.len()),
        }
    }

    /// Whether background `seq`'s `n` tokens may join: always without client requests in the
    /// batch, else as `fits` says of the batch with them.
    fn admits(
        &mut self,
        seq: &Sequence,
        n: usize,
        fits: &mut dyn FnMut(&[SegmentCost]) -> bool,
    ) -> bool {
        if self.clients == 0 {
            return true;
        }
        self.segments.push(Self::segment(seq, n));
        let ok = fits(&self.segments);
        self.segments.pop();
        ok
    }

    fn push(&mut self, seq: &Sequence, n: usize) {
        self.ids.push((seq.id, n));
        self.segments.push(Self::segment(seq, n));
        self.clients += usize::from(!seq.background);
        self.budget -= n;
    }
}
