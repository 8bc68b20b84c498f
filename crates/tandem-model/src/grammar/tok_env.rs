//! tandem's tokenizer as llguidance sees it: every token's bytes in a `toktrie::TokTrie`, and
//! tokenization through our own `tokenizers` version.
//!
//! Why not `toktrie_hf_tokenizers`: it pins `tokenizers` 0.21 and ours is 0.22, so the two
//! `Tokenizer` types differ. The trie needs only each token's bytes, which we read off the
//! vocabulary the same way (byte-level BPE through the GPT-2 byte alphabet, SentencePiece
//! byte fallback through `<0xNN>` and `▁`), and tokenization, which `TokenizerEnv` lets us route
//! to our tokenizer.

use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;
use std::collections::HashMap;
use std::sync::Arc;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// How the vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spelling {
    /// GPT-2's byte-to-character alphabet (SmolLM2, Llama 3, Qwen).
    ByteLevel,
    /// SentencePiece: `▁` for space, `<0xNN>` for bytes not in the vocabulary (Llama 2, Mistral).
    ByteFallback,
}

/// The GPT-2 byte alphabet, reversed: printable Latin-1 maps to itself, the rest to U+0100 on.
fn byte_level_chars() -> HashMap<char, u8> {
    let self_mapped =
        |b: u8| matches!(b, b'!'..=b'~') || matches!(b, 0xA1..=0xAC) || matches!(b, 0xAE..=0xFF);
    let mut next = 0x100u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        if self_mapped(b) {
            map.insert(b as char, b);
        } else if let Some(c) = char::from_u32(next) {
            map.insert(c, b);
            next += 1;
        }
    }
    map
}

fn spelling(tok: &tokenizers::Tokenizer) -> Result<Spelling> {
    let json = serde_json::to_value(tok.get_decoder())
        .map_err(|e| ModelError::Tokenizer(format!("decoder: {e}")))?;
    fn walk(v: &serde_json::Value, found: &mut Vec<String>) {
        if let Some(t) = v.get("type").and_then(|t| t.as_str()) {
            found.push(t.to_string());
        }
        if let Some(list) = v.get("decoders").and_then(|d| d.as_array()) {
            list.iter().for_each(|d| walk(d, found));
        }
    }
    let mut kinds = Vec::new();
    walk(&json, &mut kinds);
    if kinds.iter().any(|k| k == "ByteLevel") {
        Ok(Spelling::ByteLevel)
    } else if kinds
        .iter()
        .any(|k| k == "ByteFallback" || k == "Metaspace")
    {
        Ok(Spelling::ByteFallback)
    } else {
        Err(ModelError::Tokenizer(format!(
            "structured outputs need a byte-level or byte-fallback tokenizer; the decoder is {kinds:?}"
        )))
    }
}

/// Every token's bytes; special tokens get toktrie's marker byte first so that grammars never
/// produce them as text.
fn token_bytes(tok: &TextTokenizer, spelling: Spelling) -> Vec<Vec<u8>> {
    let inner = &tok.inner;
    let n = inner.get_vocab_size(true) as u32;
    let added = inner.get_added_tokens_decoder();
    let chars = byte_level_chars();
    (0..n)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return if a.special {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(a.content.as_bytes());
                    b
                } else {
                    a.content.as_bytes().to_vec()
                };
            }
            let Some(name) = inner.id_to_token(id) else {
                return Vec::new();
            };
            match spelling {
                Spelling::ByteLevel => name
                    .chars()
                    .map(|c| chars.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // A token outside the alphabet cannot be produced as text: it stays empty
                    // (never allowed by a grammar).
                    .unwrap_or_default(),
                Spelling::ByteFallback => {
                    let hex = name
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .filter(|h| h.len() == 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => vec![b],
                        None => name.replace('\u{2581}', " ").into_bytes(),
                    }
                }
            }
        })
        .collect()
}

/// A `TokenizerEnv` over tandem's tokenizer.
pub struct TandemTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TandemTokEnv {
    /// The environment for `tok`, padded to `n_vocab` logits (a model's embedding may have more
    /// rows than the tokenizer has tokens; those rows are never allowed).
    pub fn build(tok: &TextTokenizer, n_vocab: usize) -> Result<TokEnv> {
        let spelling = spelling(&tok.inner)?;
        let mut words = token_bytes(tok, spelling);
        if words.len() > n_vocab {
            return Err(ModelError::Tokenizer(format!(
                "the tokenizer has {} tokens but the model only {n_vocab} logits",
                words.len()
            )));
        }
        while words.len() < n_vocab {
            let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            w.extend_from_slice(format!("<[{}]>", words.len()).as_bytes());
            words.push(w);
        }
        let eos = tok
            .eos_token_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < n_vocab)
            .collect::<Vec<_>>();
        let first = *eos.first().ok_or_else(|| {
            ModelError::Tokenizer("structured outputs need an end-of-sequence token".into())
        })?;
        let info = TokRxInfo::new(n_vocab as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        // Tokenization without the prepended space SentencePiece normalizers add: grammars
        // tokenize fragments of text, not whole prompts.
        let mut tokenizer = tok.inner.clone();
        if spelling == Spelling::ByteFallback {
            tokenizer.with_normalizer(None::<tokenizers::NormalizerWrapper>);
        }
        Ok(Arc::new(TandemTokEnv { trie, tokenizer }))
    }

    fn encode(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer
            .encode(text.as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            // The trie's greedy tokenization covers what the tokenizer refuses.
            .unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
}

impl TokenizerEnv for TandemTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.encode(text.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_is_a_bijection() {
        let m = byte_level_chars();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // GPT-2 spells a space as U+0120 'Ġ' and a newline as U+010A 'Ċ'.
        assert_eq!(m[&'\u{120}'], b' ');
        assert_eq!(m[&'\u{10A}'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }
}
