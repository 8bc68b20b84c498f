//! tandem: the binary. Parses the command line and wires the crates together; no model or
//! scheduling logic lives here.

mod adapter;
mod bench;
mod bench_attention;
mod bench_coserve;
mod bench_coserve_jobs;
mod bench_dense;
mod bench_dpo;
mod bench_finetune;
mod bench_kernels;
mod bench_prefix;
mod bench_store;
mod bench_structured;
mod cli;
mod device_memory;
mod finetune;
mod finetune_rl;
mod generate;
mod serve;

use anyhow::Result;
use clap::Parser;

/// Fixes candle's CPU thread count for the process. Unless `RAYON_NUM_THREADS` is set, candle
/// works it out again on every CPU matmul, parsing /proc/cpuinfo each time (~40 us; 12% of a
/// batch-1 decode step of the default model). Setting the variable to the value candle would
/// compute keeps the count and skips the parsing. Runs first in `main`, before any thread.
fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Keeps freed memory in the process for reuse instead of handing it back to the OS after every
/// large free. glibc's defaults serve a buffer of more than its adaptive threshold with a fresh
/// mapping and shrink a heap whose top is free, so a training step's activations (a few MB per
/// layer, allocated and freed every step) were mapped, faulted in page by page, zeroed by the
/// kernel and unmapped again each step (14,000 page faults per step on the banana lines;
/// `tandem finetune` 1-3% more tok/s without them, docs/benchmarks.md). What stays is bounded
/// by the peak in use, which is what the process needed anyway; `tandem serve`'s engine still
/// hands free memory back when it goes idle (`malloc_trim`). Runs first in `main`.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it is called before any other
    // thread exists.
    unsafe {
        // Buffers up to 32 MiB come from the heap (glibc's largest threshold), which is never
        // trimmed on free (only by malloc_trim).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    pin_cpu_threads();
    let cli = cli::Cli::parse();
    let default_level = match cli.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line; the fields of the span a line was logged in (a request's
        // request_id, an iteration's number) come with it.
        cli::LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        cli::LogFormat::Text => fmt.init(),
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Generate(args) => generate::run(args),
        cli::Command::Bench(cli::BenchCommand::Decode(args)) => bench::decode(args),
        cli::Command::Bench(cli::BenchCommand::Lora(args)) => bench::lora(args),
        cli::Command::Bench(cli::BenchCommand::Kernels(args)) => bench_kernels::kernels(args),
        cli::Command::Bench(cli::BenchCommand::Attention(args)) => bench_attention::run(args),
        cli::Command::Bench(cli::BenchCommand::Finetune(args)) => bench_finetune::run(args),
        cli::Command::Bench(cli::BenchCommand::Coserve(args)) => bench_coserve::run(args),
        cli::Command::Bench(cli::BenchCommand::Logits(args)) => bench::logits(args),
        cli::Command::Bench(cli::BenchCommand::Prefix(args)) => bench_prefix::run(args),
        cli::Command::Bench(cli::BenchCommand::Structured(args)) => bench_structured::run(args),
        cli::Command::Bench(cli::BenchCommand::Dpo(args)) => bench_dpo::run(args),
        cli::Command::Bench(cli::BenchCommand::Store(args)) => bench_store::run(args),
        cli::Command::Bench(cli::BenchCommand::Dense(args)) => bench_dense::run(args),
        cli::Command::Adapter(cli::AdapterCommand::Check(args)) => adapter::check(args),
        cli::Command::Finetune(args) => finetune::run(args),
    }
}
