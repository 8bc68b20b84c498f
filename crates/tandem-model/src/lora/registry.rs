//! The adapter registry: adapters known by name, up to `max_loras` of them resident on the device
//! in per-(layer, projection) pools of `max_lora_rank` rows per slot. Adapters pinned by running
//! sequences are never evicted; idle ones leave least-recently-used first; a known adapter that
//! is not resident is loaded from disk when a batch needs it.

use super::{LoraAdapter, Proj};
use crate::error::{ModelError, Result};
use crate::ModelConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Adapters resident at once (vLLM's --max-loras).
    pub max_loras: usize,
    /// Largest rank accepted (vLLM's --max-lora-rank); each slot reserves this many rows.
    pub max_lora_rank: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_loras: 4,
            max_lora_rank: 64,
        }
    }
}

struct Entry {
    name: String,
    path: PathBuf,
    /// An adapter held in memory (one being trained): installed from here, not from `path`.
    live: Option<LoraAdapter>,
    slot: Option<usize>,
    pins: usize,
    last_used: u64,
}

pub(crate) struct Pool {
    /// [max_loras * max_lora_rank, in]: A rows.
    pub a: Tensor,
    /// [max_loras * max_lora_rank, out]: Bᵀ rows.
    pub bt: Tensor,
}

pub struct AdapterRegistry {
    cfg: RegistryConfig,
    model: ModelConfig,
    device: Device,
    dtype: DType,
    entries: HashMap<u32, Entry>,
    by_name: HashMap<String, u32>,
    next_id: u32,
    slots: Vec<Option<u32>>,
    /// Per slot: (layer, projection) -> (rank, scale).
    slot_modules: Vec<HashMap<(usize, Proj), (usize, f32)>>,
    /// Per layer, per projection; allocated when an adapter first targets it.
    pools: Vec<[Option<Pool>; 7]>,
    clock: u64,
    /// Loads from disk since start (for metrics).
    pub loads: u64,
    pub evictions: u64,
}

impl AdapterRegistry {
    pub fn new(cfg: RegistryConfig, model: &ModelConfig, device: &Device, dtype: DType) -> Self {
        Self {
            cfg,
            model: model.clone(),
            device: device.clone(),
            dtype,
            entries: HashMap::new(),
            by_name: HashMap::new(),
            next_id: 0,
            slots: vec![None; cfg.max_loras],
            slot_modules: vec![HashMap::new(); cfg.max_loras],
            pools: (0..model.num_hidden_layers)
                .map(|_| Default::default())
                .collect(),
            clock: 0,
            loads: 0,
            evictions: 0,
        }
    }

    pub fn config(&self) -> RegistryConfig {
        self.cfg
    }

    /// Checks the adapter at `path` against the base model and registers it under `name`,
    /// resident at once if a slot is free.
    pub fn register(&mut self, name: &str, path: &Path) -> Result<u32> {
        if self.by_name.contains_key(name) {
            return Err(ModelError::field(
                path,
                "name",
                format!("an adapter named `{name}` is already loaded"),
            ));
        }
        let adapter = self.read(path)?;
        let id = self.add_entry(name, path);
        if let Some(slot) = self.slots.iter().position(Option::is_none) {
            self.install(id, slot, &adapter)?;
        }
        Ok(id)
    }

    /// Registers an adapter held in memory (e.g. one being trained) under `name`, resident at
    /// once if a slot is free. `replace_live` swaps in new weights.
    pub fn register_live(&mut self, name: &str, adapter: LoraAdapter) -> Result<u32> {
        if self.by_name.contains_key(name) {
            return Err(ModelError::field(
                name,
                "name",
                format!("an adapter named `{name}` is already loaded"),
            ));
        }
        self.check_rank(Path::new(name), &adapter)?;
        let id = self.add_entry(name, Path::new(""));
        if let Err(e) = self.replace_live(id, adapter) {
            self.entries.remove(&id);
            self.by_name.remove(name);
            return Err(e);
        }
        Ok(id)
    }

    /// A new, not yet resident entry.
    fn add_entry(&mut self, name: &str, path: &Path) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                name: name.into(),
                path: path.into(),
                live: None,
                slot: None,
                pins: 0,
                last_used: 0,
            },
        );
        self.by_name.insert(name.into(), id);
        id
    }

    /// New weights for a live adapter; rewritten into its slot if it is resident.
    pub fn replace_live(&mut self, id: u32, adapter: LoraAdapter) -> Result<()> {
        let Some(e) = self.entries.get(&id) else {
            return Err(ModelError::Batch(format!("adapter {id} is not registered")));
        };
        let name = e.name.clone();
        self.check_rank(Path::new(&name), &adapter)?;
        let slot = match e.slot {
            Some(s) => Some(s),
            None => self.slots.iter().position(Option::is_none),
        };
        if let Some(slot) = slot {
            self.slot_modules[slot].clear();
            self.install(id, slot, &adapter)?;
        }
        if let Some(e) = self.entries.get_mut(&id) {
            e.live = Some(adapter);
        }
        Ok(())
    }

    /// Forgets an adapter. Refused while a sequence uses it.
    pub fn unregister(&mut self, name: &str) -> Result<()> {
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| ModelError::field(name, "name", "no such adapter"))?;
        if self.entries[&id].pins > 0 {
            return Err(ModelError::field(
                name,
                "name",
                "the adapter is in use by running requests",
            ));
        }
        if let Some(slot) = self.entries[&id].slot {
            self.slots[slot] = None;
            self.slot_modules[slot].clear();
        }
        self.entries.remove(&id);
        self.by_name.remove(name);
        Ok(())
    }

    /// Adapter `id`'s weights: the live ones, or read from its directory (what a job that
    /// starts from this adapter begins with).
    pub fn adapter(&self, id: u32) -> Result<LoraAdapter> {
        let e = self
            .entries
            .get(&id)
            .ok_or_else(|| ModelError::Batch(format!("adapter {id} is not registered")))?;
        match &e.live {
            Some(a) => Ok(a.clone()),
            None => self.read(&e.path),
        }
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        self.entries.get(&id).map(|e| e.name.as_str())
    }

    /// (name, path) of every registered adapter, sorted by name.
    pub fn adapters(&self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .filter(|e| e.live.is_none())
            .map(|e| (e.name.clone(), e.path.clone()))
            .collect();
        v.sort();
        v
    }

    /// Every registered adapter's name, live ones (being trained) included, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.values().map(|e| e.name.clone()).collect();
        v.sort();
        v
    }

    pub fn resident(&self) -> Vec<String> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|id| self.name(*id).map(str::to_string))
            .collect()
    }

    /// A running sequence uses `id`: it may not be evicted until `unpin`.
    pub fn pin(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.pins += 1;
        }
    }

    pub fn unpin(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Makes every adapter in `ids` resident, loading from disk and evicting idle adapters
    /// (least recently used first) as needed.
    pub fn ensure_resident(&mut self, ids: &[u32]) -> Result<()> {
        self.clock += 1;
        for &id in ids {
            let Some(e) = self.entries.get_mut(&id) else {
                return Err(ModelError::Batch(format!("adapter {id} is not registered")));
            };
            e.last_used = self.clock;
            if e.slot.is_some() {
                continue;
            }
            let slot = match self.slots.iter().position(Option::is_none) {
                Some(s) => s,
                None => {
                    let victim = self
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(s, o)| o.map(|v| (s, v)))
                        .filter(|(_, v)| self.entries[v].pins == 0 && !ids.contains(v))
                        .min_by_key(|(_, v)| self.entries[v].last_used)
                        .map(|(s, _)| s)
                        .ok_or_else(|| {
                            ModelError::Batch(format!(
                                "all {} adapter slots are in use",
                                self.cfg.max_loras
                            ))
                        })?;
                    if let Some(old) = self.slots[victim].take() {
                        if let Some(e) = self.entries.get_mut(&old) {
                            e.slot = None;
                        }
                        self.evictions += 1;
                    }
                    self.slot_modules[victim].clear();
                    victim
                }
            };
            let adapter = match &self.entries[&id].live {
                Some(a) => a.clone(),
                None => self.read(&self.entries[&id].path.clone())?,
            };
            self.install(id, slot, &adapter)?;
        }
        Ok(())
    }

    pub fn slot(&self, id: u32) -> Option<usize> {
        self.entries.get(&id).and_then(|e| e.slot)
    }

    pub(crate) fn pool(&self, layer: usize, p: Proj) -> Option<&Pool> {
        self.pools.get(layer)?[p.index()].as_ref()
    }

    /// (first pool row, rank, scale) of `slot`'s weights for (layer, projection), if it targets it.
    pub(crate) fn slot_module(
        &self,
        slot: usize,
        layer: usize,
        p: Proj,
    ) -> Option<(usize, usize, f32)> {
        let (r, s) = self.slot_modules.get(slot)?.get(&(layer, p))?;
        Some((slot * self.cfg.max_lora_rank, *r, *s))
    }

    fn read(&self, path: &Path) -> Result<LoraAdapter> {
        let adapter = LoraAdapter::load(path, &self.model, &self.device, self.dtype)?;
        self.check_rank(path, &adapter)?;
        Ok(adapter)
    }

    fn check_rank(&self, path: &Path, adapter: &LoraAdapter) -> Result<()> {
        if let Some(((l, p), w)) = adapter
            .weights
            .iter()
            .find(|(_, w)| w.rank() > self.cfg.max_lora_rank)
        {
            return Err(ModelError::field(
                path,
                format!("layers.{l}.{}", p.name()),
                format!(
                    "rank {} is above the server's max LoRA rank {}",
                    w.rank(),
                    self.cfg.max_lora_rank
                ),
            ));
        }
        Ok(())
    }

    fn install(&mut self, id: u32, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        let rows = self.cfg.max_loras * self.cfg.max_lora_rank;
        let mut modules = HashMap::new();
        for (&(layer, p), w) in &adapter.weights {
            let (inp, out) = p.dims(&self.model);
            let pool = match &mut self.pools[layer][p.index()] {
                Some(pool) => pool,
                slot_pool @ None => slot_pool.insert(Pool {
                    a: Tensor::zeros((rows, inp), self.dtype, &self.device)?,
                    bt: Tensor::zeros((rows, out), self.dtype, &self.device)?,
                }),
            };
            let row = slot * self.cfg.max_lora_rank;
            pool.a
                .slice_set(&w.a.to_dtype(self.dtype)?.contiguous()?, 0, row)?;
            pool.bt
                .slice_set(&w.b.t()?.to_dtype(self.dtype)?.contiguous()?, 0, row)?;
            modules.insert((layer, p), (w.rank(), w.scale as f32));
        }
        self.slot_modules[slot] = modules;
        self.slots[slot] = Some(id);
        if let Some(e) = self.entries.get_mut(&id) {
            e.slot = Some(slot);
        }
        self.loads += 1;
        Ok(())
    }
}
