//! Rebuilding a tokenizer from a GGUF file's `tokenizer.ggml.*` metadata with the `tokenizers`
//! crate: byte-level BPE (`gpt2`: SmolLM, Llama 3, Qwen2) and SentencePiece BPE (`llama`:
//! Llama 2, Mistral, TinyLlama), as the models' own tokenizer.json files would have them.

use crate::chat_template::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use std::path::Path;

// Pre-tokenizer regexes, as in the models' own tokenizer.json files.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TextTokenizer {
    /// Rebuilds the tokenizer stored in a GGUF file's metadata (byte-level BPE, `gpt2` model).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = &g.path;
        let model = g.meta_str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(ModelError::field(
                path,
                "tokenizer.ggml.model",
                format!(
                    "`{model}` tokenizers are not supported (supported: gpt2 byte-level BPE, llama SentencePiece); \
                     use the model's HF directory"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let Some(Value::Array(a)) = g.meta(key) else {
                return Err(ModelError::field(path, key, "missing or not an array"));
            };
            a.iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| ModelError::field(path, key, "not an array of strings"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(_) => numbers(g, "tokenizer.ggml.token_type", "i32", |v| v.to_i32().ok())?,
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match g.meta(key) {
                None => Ok(None),
                Some(v) => v
                    .to_u32()
                    .map(Some)
                    .map_err(|_| ModelError::field(path, key, "not a u32")),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = match g.meta("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            // llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not.
            _ => model == "llama",
        };

        let (pre_tokenizer, normalizer, decoder, bpe) = if model == "gpt2" {
            let merges = strings("tokenizer.ggml.merges")?;
            let pre = g.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
            gpt2_parts(&tokens, merges, pre, path)
        } else {
            if g.meta("tokenizer.ggml.scores").is_none() {
                return Err(ModelError::field(
                    path,
                    "tokenizer.ggml.scores",
                    "missing (a SentencePiece vocabulary needs scores)",
                ));
            }
            let scores = numbers(g, "tokenizer.ggml.scores", "f32", |v| v.to_f32().ok())?;
            if scores.len() != tokens.len() {
                return Err(ModelError::field(
                    path,
                    "tokenizer.ggml.scores",
                    format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            let unk = id("tokenizer.ggml.unknown_token_id")?
                .and_then(|i| tokens.get(i as usize).cloned());
            let add_prefix = !matches!(
                g.meta("tokenizer.ggml.add_space_prefix"),
                Some(Value::Bool(false))
            );
            spm_parts(&tokens, &scores, unk, add_prefix)
        };
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.get(i).copied().unwrap_or(1);
            // 3: control (special), 4: user-defined (added, not special).
            if ty == 3 || ty == 4 {
                added.push(
                    json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        let post = match (add_bos, bos) {
            (true, Some(b)) => {
                let bos_str = tokens.get(b as usize).cloned().unwrap_or_default();
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos_str, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos_str, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos_str.clone(): {"id": bos_str, "ids": [b], "tokens": [bos_str]}}})
            }
            _ => Json::Null,
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer, "post_processor": post,
            "decoder": decoder, "model": bpe
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
                ModelError::field(
                    path,
                    "tokenizer.ggml.*",
                    format!("cannot build a tokenizer: {e}"),
                )
            })?;
        let template = g.meta_str("tokenizer.chat_template")?.map(str::to_string);
        let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let mut tok = Self {
            inner,
            eos_token_ids: eos.into_iter().collect(),
            bos_token: name(bos),
            eos_token: name(eos),
            chat_template: template.map(ChatTemplate::new).transpose()?,
        };
        tok.add_end_of_turn_tokens();
        Ok(tok)
    }
}

/// A metadata array of numbers, each converted by `conv`; the error names the key and `what`.
fn numbers<T>(
    g: &GgufFile,
    key: &str,
    what: &str,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    let bad = || ModelError::field(&g.path, key, format!("not an array of {what}"));
    match g.meta(key) {
        Some(Value::Array(a)) => a.iter().map(|v| conv(v).ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

/// Tokenizer parts (pre-tokenizer, normalizer, decoder, model) of a byte-level BPE vocabulary,
/// as the models' own tokenizer.json files have them.
fn gpt2_parts(
    tokens: &[String],
    merges: Vec<String>,
    pre: &str,
    path: &Path,
) -> (Json, Json, Json, Json) {
    let vocab: Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (pre_tokenizer, ignore_merges) = match pre {
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
        other => {
            tracing::warn!(pre = other, file = %path.display(), "unknown tokenizer.ggml.pre; using GPT-2's byte-level pre-tokenizer");
            (byte_level(true), false)
        }
    };
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let bpe = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
        "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges});
    (pre_tokenizer, Json::Null, decoder, bpe)
}

/// Tokenizer parts of a SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama), converted
/// the way HF's `LlamaConverter` does: merges derived from the pieces and their scores, byte
/// fallback through the `<0xNN>` tokens, "▁" for spaces.
fn spm_parts(
    tokens: &[String],
    scores: &[f32],
    unk: Option<String>,
    add_prefix: bool,
) -> (Json, Json, Json, Json) {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Every split of a piece into two known pieces is a merge, ranked by the piece's score
    // (higher first), ties by the ids of the two halves.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                merges.push((score, a, b, l, r));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<Json> = merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect();
    let vocab: Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let mut norm = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})];
    if add_prefix {
        norm.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
    }
    let normalizer = json!({"type": "Sequence", "normalizers": norm});
    let mut dec = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let decoder = json!({"type": "Sequence", "decoders": dec});
    let bpe = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": vocab, "merges": merges});
    (Json::Null, normalizer, decoder, bpe)
}
