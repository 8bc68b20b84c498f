//! `tandem generate`: one prompt through the engine, text streamed to stdout.

use crate::cli::{DTypeArg, DeviceArg, GenerateArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::io::Write;
use tandem_model::lora::RegistryConfig;
use tandem_model::{
    default_dtype, load_model, ChatMessage, LoadedModel, ModelRunner, SamplingParams,
};
use tandem_scheduler::{LlmEngine, SchedulerConfig};

pub const BLOCK_SIZE: usize = 16;

pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::new_cuda(0).context(
            "cannot open CUDA device 0 (is this a `--features cuda` build on a GPU host?)",
        ),
    }
}

pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let dev = device(args.device)?;
    let what = args
        .model
        .as_ref()
        .map_or("the default model".to_string(), |p| p.display().to_string());
    let dtype = match args.dtype {
        DTypeArg::Auto => default_dtype(&dev),
        DTypeArg::F32 => candle_core::DType::F32,
        DTypeArg::Bf16 => candle_core::DType::BF16,
    };
    load_model(args.model.as_deref(), &dev, dtype).with_context(|| format!("cannot load {what}"))
}

/// An engine with a KV cache of `num_blocks` blocks and room for `lora.max_loras` adapters.
pub fn engine(
    m: LoadedModel,
    num_blocks: usize,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    lora: RegistryConfig,
) -> Result<LlmEngine> {
    let max_model_len = m.model.cfg.max_position_embeddings;
    let runner = ModelRunner::with_adapters(m.model, num_blocks, BLOCK_SIZE, lora)?;
    Ok(LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs,
            max_batched_tokens,
            block_size: BLOCK_SIZE,
            num_blocks,
            max_model_len,
            max_loras: lora.max_loras,
            enable_prefix_caching: true,
        },
    ))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: false,
        logprobs: None,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        min_p: args.min_p,
        ..SamplingParams::default()
    };
    if let Err(e) = params.validate() {
        bail!("invalid sampling option: {e}");
    }
    let m = load(&args.model)?;
    let has_template = m.tokenizer.chat_template.is_some();
    let chat = if args.no_chat {
        false
    } else if args.chat && !has_template {
        bail!(
            "--chat: the model {} has no chat template",
            m.path.display()
        );
    } else {
        has_template
    };
    let prompt = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage::new("system", s.as_str()));
        }
        msgs.push(ChatMessage::new("user", args.prompt.as_str()));
        let text = m.tokenizer.apply_chat_template(&msgs, true)?;
        m.tokenizer.encode(&text, false)?
    } else {
        m.tokenizer.encode(&args.prompt, true)?
    };
    let max_len = m.model.cfg.max_position_embeddings;
    let total = (prompt.len() + args.max_tokens).min(max_len);
    let blocks = total.div_ceil(BLOCK_SIZE) + 1;
    let mut engine = engine(
        m,
        blocks,
        1,
        512,
        RegistryConfig {
            max_loras: 1,
            max_lora_rank: 256,
        },
    )?;
    let adapter = match &args.adapter {
        Some(dir) => {
            engine
                .runner
                .adapters
                .register("adapter", dir)
                .with_context(|| format!("cannot load the adapter {}", dir.display()))?;
            Some("adapter")
        }
        None => None,
    };
    engine
        .add_request(prompt, params, adapter)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = std::io::stdout().lock();
    while engine.has_work() {
        for o in engine.step()? {
            out.write_all(o.text.as_bytes())?;
            out.flush()?;
        }
    }
    writeln!(out)?;
    Ok(())
}
