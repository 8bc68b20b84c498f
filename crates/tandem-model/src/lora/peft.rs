//! HF PEFT's LoRA format: `adapter_config.json` + `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (A: [r, in], B: [out, r]).
//! Scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` and
//! `alpha_pattern` override per module.

use super::Proj;
use crate::error::{candle_message, ModelError, Result};
use crate::ModelConfig;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// As written: a list of module names, or one regex string (kept verbatim).
    pub target_modules: Value,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
    pub alpha_pattern: HashMap<String, f64>,
}

/// PEFT's rule for `rank_pattern` / `alpha_pattern` keys: `key` (a regex) names the module
/// whose dotted path (`model.layers.0.self_attn.q_proj`) matches `(.*\.)?(key)$` from its start.
fn pattern_matches(key: &str, module: &str) -> bool {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).is_ok_and(|re| re.is_match(module))
}

impl LoraConfig {
    /// The scale of a module of rank `r` named `module` (its full dotted path): alpha from the
    /// first `alpha_pattern` key (in key order) that matches it as PEFT matches, else lora_alpha.
    pub fn scale(&self, module: &str, r: usize) -> f64 {
        let mut keys: Vec<_> = self.alpha_pattern.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let alpha = keys
            .into_iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map(|(_, a)| *a)
            .unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// lora_A: [r, in]
    pub a: Tensor,
    /// lora_B: [out, r]
    pub b: Tensor,
    pub scale: f64,
}

impl LoraWeights {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// Per (layer, projection).
    pub weights: BTreeMap<(usize, Proj), LoraWeights>,
}

fn module_path(layer: usize, p: Proj) -> String {
    format!("model.layers.{layer}.{}.{}", p.parent(), p.name())
}

/// Parses `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.name].weight`.
fn parse_key(key: &str) -> Option<(usize, &str, char)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let (module, ab) = rest.split_once(".lora_")?;
    let which = match ab.split('.').next()? {
        "A" => 'A',
        "B" => 'B',
        _ => return None,
    };
    let proj = module.rsplit('.').next()?;
    Some((layer, proj, which))
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory and checks it against the base model's config.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: cfg_path.clone(),
            format: "JSON",
            msg: e.to_string(),
        })?;
        let config = parse_config(&v, &cfg_path)?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(ModelError::field(
                dir.join("adapter_model.bin"),
                "format",
                "pickled adapters are not loaded (unsafe); save it with safetensors (PEFT's default)",
            ));
        }
        let tensors = crate::safetensors_dir::load_safetensors_file(&st_path, dtype, device)?;
        let mut a_map: HashMap<(usize, Proj), (String, Tensor)> = HashMap::new();
        let mut b_map: HashMap<(usize, Proj), (String, Tensor)> = HashMap::new();
        for (key, t) in tensors {
            let (layer, proj, which) = parse_key(&key).ok_or_else(|| ModelError::Tensor {
                path: st_path.clone(),
                tensor: key.clone(),
                msg: format!("not a LoRA weight of a supported module ({})", Proj::NAMES),
            })?;
            let proj = Proj::from_name(proj).ok_or_else(|| ModelError::Tensor {
                path: st_path.clone(),
                tensor: key.clone(),
                msg: format!("unknown module `{proj}` (supported: {})", Proj::NAMES),
            })?;
            if layer >= model.num_hidden_layers {
                return Err(ModelError::Tensor {
                    path: st_path.clone(),
                    tensor: key,
                    msg: format!(
                        "layer {layer} does not exist: the base model has {}",
                        model.num_hidden_layers
                    ),
                });
            }
            let finite = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(ModelError::Tensor {
                    path: st_path.clone(),
                    tensor: key,
                    msg: "holds NaN or infinite values".into(),
                });
            }
            let map = if which == 'A' { &mut a_map } else { &mut b_map };
            map.insert((layer, proj), (key, t));
        }
        let mut weights = BTreeMap::new();
        for (k, (a_name, a)) in a_map {
            let (b_name, b) = b_map.remove(&k).ok_or_else(|| ModelError::MissingTensor {
                path: st_path.clone(),
                tensor: a_name.replace("lora_A", "lora_B"),
            })?;
            let (inp, out) = k.1.dims(model);
            let r = a.dims().first().copied().unwrap_or(0);
            if a.dims() != [r, inp] || r == 0 {
                return Err(ModelError::Shape {
                    path: st_path.clone(),
                    tensor: a_name,
                    expected: vec![r.max(1), inp],
                    got: a.dims().to_vec(),
                });
            }
            if b.dims() != [out, r] {
                return Err(ModelError::Shape {
                    path: st_path.clone(),
                    tensor: b_name,
                    expected: vec![out, r],
                    got: b.dims().to_vec(),
                });
            }
            let scale = config.scale(&module_path(k.0, k.1), r);
            weights.insert(k, LoraWeights { a, b, scale });
        }
        if let Some((name, _)) = b_map.into_values().next() {
            return Err(ModelError::MissingTensor {
                path: st_path,
                tensor: name.replace("lora_B", "lora_A"),
            });
        }
        if weights.is_empty() {
            return Err(ModelError::field(
                &st_path,
                "tensors",
                "no LoRA weights in the file",
            ));
        }
        Ok(Self { config, weights })
    }

    /// Writes the adapter in PEFT's format (f32 tensors), loadable by HF PEFT and by `load`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let targets: Vec<&str> = {
            let mut t: Vec<Proj> = self.weights.keys().map(|k| k.1).collect();
            t.sort();
            t.dedup();
            t.into_iter().map(Proj::name).collect()
        };
        let c = &self.config;
        let cfg = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.lora_alpha,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": c.use_rslora,
            "fan_in_fan_out": false, "base_model_name_or_path": c.base_model_name_or_path,
            "inference_mode": true, "modules_to_save": null, "init_lora_weights": true,
            "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {},
            "alpha_pattern": c.alpha_pattern, "use_dora": false, "revision": null,
        });
        let mut tensors = HashMap::new();
        for ((layer, p), w) in &self.weights {
            let base = format!("base_model.model.{}", module_path(*layer, *p));
            tensors.insert(
                format!("{base}.lora_A.weight"),
                w.a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            );
            tensors.insert(
                format!("{base}.lora_B.weight"),
                w.b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            );
        }
        // Write to temporary names, then rename: a reader never sees half an adapter.
        let st = dir.join("adapter_model.safetensors");
        let st_tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &st_tmp).map_err(|e| ModelError::Tensor {
            path: st_tmp.clone(),
            tensor: "*".into(),
            msg: candle_message(&e),
        })?;
        let cfg_path = dir.join("adapter_config.json");
        let cfg_tmp = dir.join(".adapter_config.json.tmp");
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| ModelError::field(&cfg_path, "*", e.to_string()))?;
        std::fs::write(&cfg_tmp, text).map_err(|e| ModelError::io(&cfg_tmp, e))?;
        std::fs::rename(&st_tmp, &st).map_err(|e| ModelError::io(&st, e))?;
        std::fs::rename(&cfg_tmp, &cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        Ok(())
    }
}

fn parse_config(v: &Value, path: &Path) -> Result<LoraConfig> {
    let field = |f: &str, msg: &str| ModelError::field(path, f, msg);
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(field(
                "peft_type",
                &format!("`{other}` is not supported (only LORA)"),
            ))
        }
        None => return Err(field("peft_type", "missing")),
    }
    match v.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(field(
                "bias",
                &format!("`{other}` is not supported (only \"none\")"),
            ))
        }
    }
    for (flag, what) in [
        ("fan_in_fan_out", "fan_in_fan_out"),
        ("use_dora", "DoRA"),
        ("lora_bias", "lora_bias (a trained bias on lora_B)"),
    ] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(field(flag, &format!("{what} adapters are not supported")));
        }
    }
    // Options that add weights or layers beyond LoRA's A and B.
    for (key, what) in [
        ("layer_replication", "layer replication"),
        ("trainable_token_indices", "trainable token embeddings"),
        (
            "target_parameters",
            "LoRA on parameters (target_parameters)",
        ),
    ] {
        let set = v.get(key).is_some_and(|x| match x {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
        if set {
            return Err(field(key, &format!("{what} is not supported")));
        }
    }
    if let Some(m) = v
        .get("modules_to_save")
        .filter(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(field(
            "modules_to_save",
            &format!("{m} (fully trained modules) are not supported"),
        ));
    }
    let target_modules = v.get("target_modules").cloned().unwrap_or(Value::Null);
    match &target_modules {
        Value::Array(list) => {
            for t in list {
                let name = t
                    .as_str()
                    .ok_or_else(|| field("target_modules", "not a list of strings"))?;
                let last = name.rsplit('.').next().unwrap_or(name);
                if Proj::from_name(last).is_none() {
                    return Err(field(
                        "target_modules",
                        &format!("unknown module `{name}` (supported: {})", Proj::NAMES),
                    ));
                }
            }
        }
        Value::String(_) => {}
        _ => {
            return Err(field(
                "target_modules",
                "missing, or neither a list nor a regex string",
            ))
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or_else(|| field("r", "missing or not a positive integer"))? as usize;
    let lora_alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(a) => a
            .as_f64()
            .ok_or_else(|| field("lora_alpha", "not a number"))?,
    };
    let alpha_pattern = match v.get("alpha_pattern") {
        None | Some(Value::Null) => HashMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, a)| {
                a.as_f64()
                    .map(|a| (k.clone(), a))
                    .ok_or_else(|| field("alpha_pattern", "values must be numbers"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(field("alpha_pattern", "not an object")),
    };
    if let Some(k) = alpha_pattern
        .keys()
        .find(|k| regex::Regex::new(&format!("^(?:{k})$")).is_err())
    {
        return Err(field(
            "alpha_pattern",
            &format!("key `{k}` is not a regular expression tandem can read"),
        ));
    }
    Ok(LoraConfig {
        r,
        lora_alpha,
        target_modules,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        alpha_pattern,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values from PEFT's own rule, `re.match(rf"(.*\.)?({key})$", module)`, run in
    /// Python on the same pairs.
    #[test]
    fn pattern_keys_match_modules_as_peft_does() {
        for (key, module, want) in [
            ("down_proj", "model.layers.3.mlp.down_proj", true),
            ("down_proj", "model.layers.3.mlp.xdown_proj", false),
            (
                "layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.q_proj",
                true,
            ),
            (
                "layers.0.self_attn.q_proj",
                "model.layers.10.self_attn.q_proj",
                false,
            ),
            (
                r"model\.layers\.[0-4]\.mlp\.down_proj",
                "model.layers.2.mlp.down_proj",
                true,
            ),
            (
                r"model\.layers\.[0-4]\.mlp\.down_proj",
                "model.layers.7.mlp.down_proj",
                false,
            ),
            ("mlp.*", "model.layers.7.mlp.up_proj", true),
            ("q_proj|v_proj", "model.layers.1.self_attn.v_proj", true),
        ] {
            assert_eq!(pattern_matches(key, module), want, "{key} ~ {module}");
        }
        let cfg = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: json!(["q_proj", "down_proj"]),
            use_rslora: false,
            base_model_name_or_path: None,
            alpha_pattern: HashMap::from([(r"model\.layers\.[0-4]\.mlp\.down_proj".into(), 4.0)]),
        };
        assert_eq!(cfg.scale(&module_path(2, Proj::Down), 8), 0.5);
        assert_eq!(cfg.scale(&module_path(7, Proj::Down), 8), 2.0);
        assert_eq!(cfg.scale(&module_path(2, Proj::Q), 8), 2.0);
    }
}
