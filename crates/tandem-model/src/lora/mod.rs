//! LoRA adapters: the HF PEFT format (load/save), the registry of adapters resident on the
//! device, and the per-batch view the forward uses to run every targeted projection through
//! tandem-kernels' `lora_sgmv`.

mod batch;
mod peft;
mod registry;

pub use batch::LoraBatch;
pub use peft::{LoraAdapter, LoraConfig, LoraWeights};
pub use registry::{AdapterRegistry, RegistryConfig};

/// The projections an adapter may target, in PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];
    pub const NAMES: &'static str = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj";

    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    /// `self_attn` or `mlp`: the HF submodule that holds the projection.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// (in, out) features of this projection in a model with `cfg`.
    pub fn dims(self, cfg: &crate::ModelConfig) -> (usize, usize) {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            Proj::Q => (h, cfg.q_dim()),
            Proj::K | Proj::V => (h, cfg.kv_dim()),
            Proj::O => (cfg.q_dim(), h),
            Proj::Gate | Proj::Up => (h, i),
            Proj::Down => (i, h),
        }
    }
}
