//! tandem-model: the model engine.
//!
//! Owns: model configs, weight loading (HF safetensors directories, GGUF), tokenizers and chat
//! templates, the default model's fetch, the Llama-family forward over packed batches, the
//! paged KV cache's tensors, LoRA adapters (PEFT format, registry, batched application),
//! token-level LoRA finetuning (data, captured forward, (layer, chunk) backward, AdamW, runs and
//! checkpoints), and sampling.
//! Must not touch: scheduling policy (which sequences run, block allocation, preemption) —
//! that is tandem-scheduler's; this crate executes the `PackedBatch` it is given.

pub mod attention;
pub mod batch;
pub mod chat_template;
pub mod config;
pub mod default_model;
pub mod error;
pub mod finetune;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod graders;
pub mod grammar;
pub mod kv_cache;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod runner;
pub mod safetensors_dir;
pub mod sampling;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod tool_calls;

pub use batch::{LogitsWanted, NewSequence, PackedBatch, ScheduledBatch, Segment, StepOutput};
pub use chat_template::ChatMessage;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use llama::{Captured, Llama};
pub use loader::{default_dtype, load_checkpoint, load_model, LoadedModel};
pub use runner::ModelRunner;
pub use sampling::{Sampler, SamplingParams, TokenLogprobs};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
