//! A sequence's state as the scheduler sees it: its tokens and how many are in the KV cache.

use tandem_model::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token, or a stop string.
    Stop,
    /// max_tokens or the context window.
    Length,
    /// The client went away.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: u64,
    pub prompt_len: usize,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub params: SamplingParams,
    /// Whether the runner has been given this sequence's sampling parameters.
    pub announced: bool,
    pub num_preemptions: usize,
    /// LoRA adapter (registry id), if any.
    pub adapter: Option<u32>,
    /// When it was queued, and when its first output token came.
    pub arrival: std::time::Instant,
    pub first_token: Option<std::time::Instant>,
    /// The request's `cache_salt`: only requests with the same salt share cached KV blocks.
    pub cache_salt: Option<String>,
    /// While its blocks may enter the prefix cache: the chain's key and the adapter weight
    /// version it was computed under.
    pub cache_key: Option<(crate::block_manager::BlockHash, u64)>,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    pub cached_tokens: usize,
    /// Engine-made work (a reinforcement job's sampled answers): queued behind every client
    /// request, and not counted as a client waiting.
    pub background: bool,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, params: SamplingParams, adapter: Option<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            params,
            announced: false,
            num_preemptions: 0,
            adapter,
            arrival: std::time::Instant::now(),
            first_token: None,
            cache_salt: None,
            cache_key: None,
            cached_tokens: 0,
            background: false,
        }
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next one can be sampled.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
