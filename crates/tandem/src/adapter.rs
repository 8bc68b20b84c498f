//! `tandem adapter check`: a PEFT adapter validated against a base model, described, and
//! optionally rewritten with tandem's PEFT writer.

use crate::generate::load;
use anyhow::{Context, Result};

/// `tandem adapter check`: loads the adapter against the model's config and describes it.
pub fn check(args: crate::cli::AdapterCheckArgs) -> Result<()> {
    let m = load(&args.model)?;
    let a = tandem_model::lora::LoraAdapter::load(
        &args.adapter,
        &m.model.cfg,
        m.model.device(),
        m.model.dtype(),
    )
    .with_context(|| {
        format!(
            "adapter {} does not fit {}",
            args.adapter.display(),
            m.path.display()
        )
    })?;
    let mut by_module: std::collections::BTreeMap<&str, (usize, Vec<usize>, f64)> =
        Default::default();
    for ((_, p), w) in &a.weights {
        let e = by_module.entry(p.name()).or_insert((0, vec![], w.scale));
        e.0 += 1;
        if !e.1.contains(&w.rank()) {
            e.1.push(w.rank());
        }
    }
    println!(
        "{}: LoRA r={} alpha={} rslora={} on {}",
        args.adapter.display(),
        a.config.r,
        a.config.lora_alpha,
        a.config.use_rslora,
        m.path.display()
    );
    for (module, (layers, ranks, scale)) in by_module {
        println!("  {module:<10} {layers:>3} layers  rank {ranks:?}  scale {scale}");
    }
    if let Some(out) = &args.save_to {
        a.save(out)?;
        println!("written to {}", out.display());
    }
    Ok(())
}
