//! tandem-api: the HTTP face of tandem, in OpenAI's shapes: completions, chat completions (with
//! SSE streaming), models, LoRA adapters loaded at run time (vLLM's routes), files and
//! fine-tuning jobs (kept in a SQLite store, jobs recovered after a restart), health, metrics.
//!
//! Owns: request validation, response shapes, streaming, authentication. Must not touch:
//! tensors or scheduling policy — requests go to the engine thread through `EngineHandle`.

pub mod adapter_files;
mod chat;
pub mod cluster;
mod completions;
mod error;
mod files;
mod graders;
mod job_events;
mod job_life;
mod job_request;
mod job_watch;
mod jobs;
pub use job_life::checkpoint_on_shutdown;
pub use job_life::recover as recover_jobs;
pub mod metrics;
mod models;
mod openai;
pub mod persist;
mod respond;
mod routes;
mod shared_adapters;
mod sse;
pub mod store;
mod structured;
pub mod tenants;
mod tokenize;
mod tools;

pub use error::{ApiError, ErrorBody, ErrorDetail};

use axum::Router;
use std::sync::Arc;
use tandem_model::TextTokenizer;
use tandem_scheduler::EngineHandle;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: TextTokenizer,
    /// The base model's name in the `model` field.
    pub model_name: String,
    pub max_model_len: usize,
    /// The model's vocabulary size (logit rows; the range of token ids in requests).
    pub vocab_size: usize,
    /// API keys, the tenant each names, and who owns which served adapter.
    pub tenants: tenants::Tenants,
    /// `--allow-runtime-lora --lora-root DIR`: POST /v1/load_lora_adapter reads adapters from
    /// under this (canonical) directory only; None: runtime loading is off.
    pub lora_root: Option<std::path::PathBuf>,
    pub metrics: metrics::Metrics,
    /// Requests in flight (being answered or streamed) beyond which new ones get 429.
    pub max_pending: usize,
    pub pending: std::sync::atomic::AtomicUsize,
    /// Where adapters loaded at run time are recorded (`--data-dir`), if anywhere.
    pub adapter_store: Option<persist::AdapterStore>,
    /// Files, fine-tuning jobs and their events: SQLite in the data dir (or in memory), or a
    /// PostgreSQL database replicas share.
    pub store: store::Store,
    /// `--data-dir`: finished jobs' adapters go to `fine_tuned/<job id>` in it.
    pub data_dir: Option<std::path::PathBuf>,
    /// `--adapter-store DIR`: jobs' checkpoints and finished adapters go here instead (a
    /// folder every replica shares); with `--adapter-store s3://...`, this replica's local
    /// copy of the bucket's adapters.
    pub adapter_dir: Option<std::path::PathBuf>,
    /// `--adapter-store s3://bucket/prefix`: the bucket adapters are published to and fetched
    /// from (`adapter_dir` holding the local copies).
    pub adapter_remote: Option<adapter_files::Remote>,
    /// This replica's part when replicas share the store (`--database-url`); None: alone.
    pub cluster: Option<cluster::Cluster>,
    /// Compiles structured-output constraints over the model's vocabulary.
    pub grammars: Arc<tandem_model::grammar::GrammarCompiler>,
}

/// The router; `main` binds it, tests bind it to port 0.
pub fn app(state: Arc<AppState>) -> Router {
    routes::router(state)
}
