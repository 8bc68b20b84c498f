//! Text <-> token ids: the HF `tokenizers` crate, loaded from `tokenizer.json` or rebuilt from a
//! GGUF file's `tokenizer.ggml.*` metadata; plus end-of-sequence ids, the chat template, and an
//! incremental decoder for streaming.

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use serde_json::Value as Json;
use std::path::Path;

#[derive(Clone)]
pub struct TextTokenizer {
    pub(crate) inner: tokenizers::Tokenizer,
    /// Ids that end a generation (EOS and end-of-turn tokens).
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<ChatTemplate>,
}

impl TextTokenizer {
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders `messages` offering `tools` (OpenAI tool objects; see `ChatTemplate::render_with_tools`).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Json],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| ModelError::ChatTemplate("the model has no chat template".into()))?;
        tpl.render_with_tools(
            messages,
            tools,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) from an
    /// HF model directory; `config_eos` are the end ids from config.json / generation_config.json.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Corrupt {
            path: path.clone(),
            format: "tokenizer.json",
            msg: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: cfg_path.clone(),
                format: "JSON",
                msg: e.to_string(),
            })?
        } else {
            Json::Null
        };
        let token_str = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_string),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        let mut eos = config_eos.to_vec();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos.push(id);
        }
        let mut tok = Self {
            inner,
            eos_token_ids: eos,
            bos_token,
            eos_token,
            chat_template: template.map(ChatTemplate::new).transpose()?,
        };
        tok.add_end_of_turn_tokens();
        Ok(tok)
    }

    /// End-of-turn markers of common chat formats also end a generation when the vocabulary has them.
    pub(crate) fn add_end_of_turn_tokens(&mut self) {
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "</s>",
            "<|end|>",
        ] {
            if let Some(id) = self.inner.token_to_id(t) {
                let special = self
                    .inner
                    .get_added_tokens_decoder()
                    .get(&id)
                    .map(|a| a.special)
                    .unwrap_or(false);
                if special && !self.eos_token_ids.contains(&id) {
                    self.eos_token_ids.push(id);
                }
            }
        }
        self.eos_token_ids.sort_unstable();
        self.eos_token_ids.dedup();
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes that do not yet form
/// whole characters (as TGI and vLLM do).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token and returns the new text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}
