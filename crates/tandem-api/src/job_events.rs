//! A fine-tuning job's events: recorded in the store (`message` and `metrics` events, OpenAI's
//! shape), and the metrics of an optimizer step or an evaluation under OpenAI's names (DPO's
//! reward accuracy and margin, reinforcement's rewards, KL and tokens sampled beside them).

use crate::store::now;
use crate::AppState;
use serde_json::{json, Value};
use tandem_model::finetune::{Eval, StepReport};

/// Records an event on job `job`; false if the store refused it (a full disk), logged.
pub(crate) async fn event(
    st: &AppState,
    job: &str,
    level: &str,
    message: &str,
    data: Option<Value>,
) -> bool {
    let kind = if data.is_some() { "metrics" } else { "message" };
    let e = json!({
        "id": format!("ftevent-{}", uuid::Uuid::new_v4().simple()),
        "object": "fine_tuning.job.event",
        "created_at": now(),
        "level": level,
        "message": message,
        "type": kind,
        "data": data.unwrap_or(json!({})),
    });
    match st.store.add_event(job, &e).await {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(job, error = %err, "cannot record a job event");
            false
        }
    }
}

/// An optimizer step's metrics, OpenAI's names; DPO adds the rewards' accuracy and margin
/// (TRL's `rewards/accuracies`, `rewards/margins`).
pub(crate) fn step_metrics(r: &StepReport) -> Value {
    let mut m = json!({"step": r.step, "total_steps": r.total_steps, "train_loss": r.loss,
        "train_mean_token_accuracy": r.accuracy, "learning_rate": r.lr,
        "grad_norm": r.grad_norm});
    if let Some(d) = &r.dpo {
        m["train_reward_accuracy"] = json!(d.reward_accuracy());
        m["train_reward_margin"] = json!(d.reward_margin());
        m["train_chosen_reward"] = json!(d.chosen_reward());
        m["train_rejected_reward"] = json!(d.rejected_reward());
    }
    if let Some(g) = &r.grpo {
        m["train_mean_reward"] = json!(g.mean_reward());
        m["train_reward_std"] = json!(g.reward_std());
        m["train_kl"] = json!(g.mean_kl());
        m["train_answers"] = json!(g.samples);
        m["train_tokens_sampled"] = json!(g.tokens_sampled);
    }
    m
}

/// An evaluation's metrics (`valid_*`), into `m`.
pub(crate) fn eval_metrics(e: &Eval, m: &mut Value) {
    if let Some(g) = &e.grpo {
        // A reinforcement evaluation samples answers: rewards, no loss.
        m["valid_mean_reward"] = json!(g.mean_reward());
        m["valid_reward_std"] = json!(g.reward_std());
        m["valid_answers"] = json!(g.samples);
        return;
    }
    m["valid_loss"] = json!(e.loss);
    m["valid_mean_token_accuracy"] = json!(e.accuracy);
    if let Some(d) = &e.dpo {
        m["valid_reward_accuracy"] = json!(d.reward_accuracy());
        m["valid_reward_margin"] = json!(d.reward_margin());
    }
}

/// DPO's reward accuracy and margin, or a reinforcement job's mean reward, for a message.
pub(crate) fn method_note(
    d: Option<&tandem_model::finetune::DpoStats>,
    g: Option<&tandem_model::finetune::GrpoStats>,
) -> String {
    match (d, g) {
        (Some(d), _) => format!(
            ", reward accuracy={:.2}, margin={:.4}",
            d.reward_accuracy(),
            d.reward_margin()
        ),
        (_, Some(g)) => format!(
            ", mean reward={:.4} (std {:.4}, {} answers)",
            g.mean_reward(),
            g.reward_std(),
            g.samples
        ),
        _ => String::new(),
    }
}
