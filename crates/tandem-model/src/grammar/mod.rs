//! Constrained decoding: a request's constraint (JSON schema, regex, choice, Lark or GBNF grammar)
//! compiled by llguidance over the model's vocabulary, and the per-sequence matcher state the
//! sampler keeps (the allowed-token mask before each draw, advanced by each drawn token).

mod gbnf;
mod tok_env;

pub use gbnf::{gbnf_to_lark, looks_like_gbnf};
pub use tok_env::TandemTokEnv;

use crate::tokenizer::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Compiled grammars kept for reuse (requests often repeat a schema).
const CACHE_ENTRIES: usize = 256;
use toktrie::SimpleVob;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON document valid against `schema`; `strict` refuses schema keywords llguidance
    /// cannot enforce (else they are ignored).
    JsonSchema {
        schema: Value,
        strict: bool,
    },
    /// Any JSON object.
    JsonObject,
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect) or a GBNF grammar (told apart by `::=`).
    Grammar(String),
}

impl Constraint {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema { .. } => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Grammar(_) => "grammar",
        }
    }

    fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Self::JsonSchema { schema, strict } => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(layout_schema(schema, *strict))
            }
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(layout_schema(&json!({"type": "object"}), false))
            }
            Self::Regex(rx) => {
                // Checked here so the error reads as a regex error, not a grammar one.
                regex::Regex::new(rx).map_err(|e| format!("invalid regex: {e}"))?;
                TopLevelGrammar::from_regex(rx)
            }
            Self::Choice(list) => {
                if list.is_empty() {
                    return Err("choice must list at least one string".into());
                }
                let alts: Vec<String> = list
                    .iter()
                    .map(|s| serde_json::to_string(s).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Self::Grammar(src) => {
                if src.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                let lark = if looks_like_gbnf(src) {
                    gbnf_to_lark(src).map_err(|e| format!("invalid GBNF grammar: {e}"))?
                } else {
                    src.clone()
                };
                TopLevelGrammar::from_lark(lark)
            }
        })
    }
}

/// Our JSON layout, unless the schema sets its own: no free whitespace (a small model
/// given free whitespace can spend every token on it), `", "` and `": "` separators as
/// Python's `json.dumps` writes them; and, as xgrammar's strict mode does (vLLM's default),
/// objects that list `properties` but say nothing of others get no others (outputs still
/// validate against the schema as given: they are a subset of what it allows).
pub fn layout_schema(schema: &Value, strict: bool) -> Value {
    let mut schema = schema.clone();
    close_objects(&mut schema);
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": !strict,
            })
        });
    }
    schema
}

/// Sets `additionalProperties: false` on every object schema with `properties` and no word on
/// other properties, through the keywords that hold subschemas.
fn close_objects(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else {
        return;
    };
    if obj.get("properties").is_some_and(Value::is_object)
        && ![
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
        ]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in [
        "properties",
        "patternProperties",
        "$defs",
        "definitions",
        "dependentSchemas",
    ] {
        if let Some(Value::Object(m)) = obj.get_mut(key) {
            m.values_mut().for_each(close_objects);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(a)) = obj.get_mut(key) {
            a.iter_mut().for_each(close_objects);
        }
    }
    for key in [
        "items",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "additionalItems",
    ] {
        match obj.get_mut(key) {
            Some(Value::Array(a)) => a.iter_mut().for_each(close_objects),
            Some(v) => close_objects(v),
            None => {}
        }
    }
}

/// Compiles constraints for one model (its tokenizer and logit count). The token trie is built
/// on first use, so servers that never constrain pay nothing.
pub struct GrammarCompiler {
    tokenizer: TextTokenizer,
    n_vocab: usize,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    /// Compiled grammars by their source, cleared when full.
    cache: Mutex<HashMap<String, Grammar>>,
}

impl GrammarCompiler {
    pub fn new(tokenizer: TextTokenizer, n_vocab: usize) -> Self {
        Self {
            tokenizer,
            n_vocab,
            factory: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| {
                let env = TandemTokEnv::build(&self.tokenizer, self.n_vocab)
                    .map_err(|e| e.to_string())?;
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.quiet();
                Ok(Arc::new(f))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The compiled constraint; the error says what is wrong with it.
    pub fn compile(&self, c: &Constraint) -> Result<Grammar, String> {
        self.cached(format!("{c:?}"), || self.build(c.to_grammar()?, c.kind()))
    }

    /// Compiles a Lark grammar written by tandem itself (tool calls), under the label `kind`.
    pub fn compile_lark(&self, lark: &str, kind: &'static str) -> Result<Grammar, String> {
        self.cached(format!("{kind}:{lark}"), || {
            self.build(TopLevelGrammar::from_lark(lark.to_string()), kind)
        })
    }

    fn cached(
        &self,
        key: String,
        build: impl FnOnce() -> Result<Grammar, String>,
    ) -> Result<Grammar, String> {
        if let Some(g) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(g);
        }
        let g = build()?;
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(key, g.clone());
        }
        Ok(g)
    }

    fn build(&self, grammar: TopLevelGrammar, kind: &'static str) -> Result<Grammar, String> {
        let parser = self
            .factory()?
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Grammar {
            kind,
            proto: Arc::new(Mutex::new(matcher)),
        })
    }
}

/// A compiled constraint, shared by the sequences that use it; each starts its own state.
#[derive(Clone)]
pub struct Grammar {
    kind: &'static str,
    proto: Arc<Mutex<Matcher>>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({})", self.kind)
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.proto, &other.proto)
    }
}

impl Grammar {
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// A fresh matcher at the start of the constrained text.
    pub fn start(&self) -> GrammarState {
        let matcher = match self.proto.lock() {
            Ok(m) => m.deep_clone(),
            Err(poisoned) => poisoned.into_inner().deep_clone(),
        };
        GrammarState {
            matcher,
            mask: None,
        }
    }
}

/// One sequence's place in its grammar.
pub struct GrammarState {
    matcher: Matcher,
    /// The mask for the next draw, when computed ahead (`prepare`).
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for GrammarState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarState")
    }
}

impl Clone for GrammarState {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
        }
    }
}

impl GrammarState {
    /// Computes the mask for the next draw (the end tokens only once the grammar is complete
    /// and can go no further). A matcher in error allows only the end tokens: the sequence ends.
    pub fn prepare(&mut self) {
        if self.mask.is_some() {
            return;
        }
        let mask = match self.matcher.compute_mask_or_eos() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "grammar matcher failed; ending the sequence");
                self.matcher
                    .tok_env()
                    .map(|t| t.tok_trie().eos_token_set())
                    .unwrap_or_else(|_| SimpleVob::alloc(0))
            }
        };
        self.mask = Some(mask);
    }

    /// Sets the logits of tokens the grammar does not allow to -inf.
    pub fn apply(&mut self, logits: &mut [f32]) {
        self.prepare();
        if let Some(mask) = &self.mask {
            let n = mask.len();
            for (i, x) in logits.iter_mut().enumerate() {
                if i >= n || !mask.get(i) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Whether `token` is allowed next.
    pub fn allows(&mut self, token: u32) -> bool {
        self.prepare();
        self.mask
            .as_ref()
            .is_some_and(|m| (token as usize) < m.len() && m.get(token as usize))
    }

    /// Advances past the drawn token.
    pub fn advance(&mut self, token: u32) {
        self.mask = None;
        if !self.matcher.is_stopped() {
            if let Err(e) = self.matcher.consume_token(token) {
                tracing::warn!(error = %e, token, "grammar matcher refused a token");
            }
        }
    }

    /// Whether the constrained text is complete (the end tokens are allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
