//! The engine loop's synchronous core (nano-vllm's `LLMEngine`): schedule, execute, post-process.
//! Post-processing turns sampled tokens into text, applies stop conditions (EOS and end-of-turn
//! ids, stop strings, max_tokens, the context window) and frees finished sequences.

use crate::scheduler::{AdmitError, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, Sequence};
use std::collections::HashMap;
use tandem_model::{
    IncrementalDecoder, ModelRunner, SamplingParams, ScheduledBatch, TextTokenizer, TokenLogprobs,
};

/// New output of one sequence after one step.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub seq_id: u64,
    /// The token sampled this step (None when the step only finished the sequence).
    pub token: Option<u32>,
    /// Text that became final this step (stop strings and held-back bytes excluded).
    pub text: String,
    pub finished: Option<FinishReason>,
    /// The token's log-probabilities, when the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Default)]
struct TextState {
    decoder: IncrementalDecoder,
    /// All decoded text.
    text: String,
    /// How much of `text` has been handed out.
    emitted: usize,
}

pub struct LlmEngine {
    pub scheduler: Scheduler,
    pub runner: ModelRunner,
    pub tokenizer: TextTokenizer,
    texts: HashMap<u64, TextState>,
    next_id: u64,
}

impl LlmEngine {
    pub fn new(runner: ModelRunner, tokenizer: TextTokenizer, cfg: SchedulerConfig) -> Self {
        Self {
            scheduler: Scheduler::new(cfg),
            runner,
            tokenizer,
            texts: HashMap::new(),
            next_id: 0,
        }
    }

    /// Queues a request, through the registered adapter named `adapter` if given; returns its
    /// sequence id.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> Result<u64, AdmitError> {
        let adapter = match adapter {
            Some(name) => Some(
                self.runner
                    .adapters
                    .id(name)
                    .ok_or_else(|| AdmitError::UnknownAdapter(name.to_string()))?,
            ),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.scheduler
            .add(Sequence::new(id, prompt, params, adapter))?;
        self.texts.insert(id, TextState::default());
        Ok(id)
    }

    pub fn abort(&mut self, id: u64) {
        self.scheduler.finish(id);
        self.texts.remove(&id);
        if let Err(e) = self.release_finished() {
            tracing::error!(error = %e, "releasing an aborted sequence failed");
        }
    }

    /// Hands the runner the sequences that left at once (sampler state, adapter pins), rather
    /// than with the next batch: an idle engine must not keep an adapter pinned.
    fn release_finished(&mut self) -> tandem_model::Result<()> {
        let finished = self.scheduler.take_finished();
        if !finished.is_empty() {
            self.runner.execute(&ScheduledBatch {
                finished,
                ..Default::default()
            })?;
        }
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// One iteration.
    pub fn step(&mut self) -> tandem_model::Result<Vec<RequestOutput>> {
        let sched = self.scheduler.schedule();
        let out = self.runner.execute(&sched)?;
        self.scheduler.update(&out.sampled);
        let mut outputs = Vec::with_capacity(out.sampled.len());
        for (id, tok) in out.sampled {
            let mut o = self.postprocess(id, tok)?;
            o.logprobs = out.logprobs.get(&id).cloned();
            outputs.push(o);
        }
        self.release_finished()?;
        Ok(outputs)
    }

    fn postprocess(&mut self, id: u64, tok: u32) -> tandem_model::Result<RequestOutput> {
        let Some(seq) = self.scheduler.get(id) else {
            return Ok(RequestOutput {
                seq_id: id,
                token: Some(tok),
                text: String::new(),
                finished: Some(FinishReason::Abort),
                logprobs: None,
            });
        };
        let params = &seq.params;
        let n_out = seq.output().len();
        let len = seq.tokens.len();
        let is_eos = !params.ignore_eos && self.tokenizer.eos_token_ids.contains(&tok);
        let state = self.texts.entry(id).or_default();
        if !is_eos {
            let piece = state.decoder.push(&self.tokenizer, tok)?;
            state.text.push_str(&piece);
        }
        let mut finished = if is_eos {
            Some(FinishReason::Stop)
        } else if n_out >= params.max_tokens || len >= self.scheduler.cfg.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        // Stop strings: search only where a new match can start, cut the text before it.
        let longest = params.stop.iter().map(String::len).max().unwrap_or(0);
        if longest > 0 {
            let from = floor_boundary(&state.text, state.emitted.saturating_sub(longest));
            if let Some(cut) = params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| state.text[from..].find(s.as_str()).map(|p| from + p))
                .min()
            {
                state.text.truncate(cut);
                finished = Some(FinishReason::Stop);
            }
        }
        // Hold back a tail that could still become a stop string.
        let end = if finished.is_some() {
            state.text.len()
        } else {
            floor_boundary(
                &state.text,
                state.text.len().saturating_sub(longest.saturating_sub(1)),
            )
        };
        let text = if end > state.emitted {
            let t = state.text[state.emitted..end].to_string();
            state.emitted = end;
            t
        } else {
            String::new()
        };
        if finished.is_some() {
            self.scheduler.finish(id);
            self.texts.remove(&id);
        }
        Ok(RequestOutput {
            seq_id: id,
            token: Some(tok),
            text,
            finished,
            logprobs: None,
        })
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
