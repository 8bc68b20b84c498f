//! Text-similarity metrics of OpenAI's `text_similarity` grader, each as its usual
//! implementation computes it (the tests hold reference values from those implementations):
//! - `fuzzy_match`: rapidfuzz's `fuzz.ratio` / 100, the normalized InDel similarity of the two
//!   strings' characters, `2 · LCS / (len a + len b)`;
//! - `bleu`: NLTK's `sentence_bleu` on whitespace tokens (uniform weights over 1- to 4-grams,
//!   clipped precisions, brevity penalty, no smoothing; 0 when some order has no match);
//! - `gleu`: NLTK's `sentence_gleu` (1- to 4-grams: matches / max(hypothesis n-grams, reference
//!   n-grams), summed over the orders);
//! - `rouge_1` … `rouge_5`, `rouge_l`: Google's `rouge-score` F-measure with its default
//!   tokenizer (lowercased, runs of letters and digits), no stemming.
//!
//! - `meteor`: NLTK's `meteor_score` on whitespace tokens (lowercased; α 0.9, β 3, γ 0.5):
//!   exact matches, then matches of NLTK's Porter stems (`porter.rs`); NLTK's third stage,
//!   WordNet synonyms, is not run (the WordNet database is not shipped), so a pair that only
//!   synonyms would align scores lower than NLTK with WordNet; the tests hold NLTK's values
//!   with an empty WordNet.
//!
//! `cosine` (embeddings) is not offered yet; validation refuses it by name.

use std::collections::HashMap;

/// The metrics offered.
pub const METRICS: &[&str] = &[
    "fuzzy_match",
    "bleu",
    "gleu",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
    "meteor",
];

/// The score of `hyp` against `reference` under `metric` (one of `METRICS`).
pub fn score(metric: &str, hyp: &str, reference: &str) -> Option<f64> {
    Some(match metric {
        "fuzzy_match" => fuzzy_ratio(hyp, reference),
        "bleu" => bleu(&words(hyp), &words(reference)),
        "gleu" => gleu(&words(hyp), &words(reference)),
        "rouge_l" => rouge_l(&rouge_tokens(hyp), &rouge_tokens(reference)),
        "meteor" => meteor(&words(hyp), &words(reference)),
        m => {
            let n: usize = m.strip_prefix("rouge_")?.parse().ok()?;
            if !(1..=5).contains(&n) {
                return None;
            }
            rouge_n(&rouge_tokens(hyp), &rouge_tokens(reference), n)
        }
    })
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// rouge-score's default tokenizer: lowercase, non-alphanumerics as separators.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn lcs<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut prev = 0;
        for (j, y) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = if x == y {
                prev + 1
            } else {
                row[j + 1].max(row[j])
            };
            prev = here;
        }
    }
    row[b.len()]
}

fn fuzzy_ratio(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    2.0 * lcs(&a, &b) as f64 / (a.len() + b.len()) as f64
}

fn ngrams<T: AsRef<str>>(toks: &[T], n: usize) -> HashMap<Vec<&str>, usize> {
    let mut m = HashMap::new();
    if toks.len() >= n {
        for w in toks.windows(n) {
            *m.entry(w.iter().map(AsRef::as_ref).collect()).or_insert(0) += 1;
        }
    }
    m
}

/// Σ over hypothesis n-grams of min(count, reference count), and the hypothesis n-grams.
fn clipped<T: AsRef<str>>(hyp: &[T], reference: &[T], n: usize) -> (usize, usize) {
    let (h, r) = (ngrams(hyp, n), ngrams(reference, n));
    let matched = h
        .iter()
        .map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0)))
        .sum();
    (matched, h.values().sum())
}

fn bleu(hyp: &[&str], reference: &[&str]) -> f64 {
    if hyp.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let (m, total) = clipped(hyp, reference, n);
        if m == 0 || total == 0 {
            return 0.0;
        }
        log_sum += 0.25 * (m as f64 / total as f64).ln();
    }
    let (c, r) = (hyp.len() as f64, reference.len() as f64);
    let bp = if c > r { 1.0 } else { (1.0 - r / c).exp() };
    bp * log_sum.exp()
}

fn gleu(hyp: &[&str], reference: &[&str]) -> f64 {
    let (mut tp, mut tpfp, mut tpfn) = (0, 0, 0);
    for n in 1..=4 {
        let (m, h) = clipped(hyp, reference, n);
        tp += m;
        tpfp += h;
        tpfn += ngrams(reference, n).values().sum::<usize>();
    }
    let d = tpfp.max(tpfn);
    if d == 0 {
        0.0
    } else {
        tp as f64 / d as f64
    }
}

fn f_measure(matched: usize, hyp: usize, reference: usize) -> f64 {
    if matched == 0 || hyp == 0 || reference == 0 {
        return 0.0;
    }
    let (p, r) = (
        matched as f64 / hyp as f64,
        matched as f64 / reference as f64,
    );
    2.0 * p * r / (p + r)
}

fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> f64 {
    let (m, h) = clipped(hyp, reference, n);
    let r = ngrams(reference, n).values().sum();
    f_measure(m, h, r)
}

fn rouge_l(hyp: &[String], reference: &[String]) -> f64 {
    f_measure(lcs(hyp, reference), hyp.len(), reference.len())
}

/// Words with their positions.
type Enum = Vec<(usize, String)>;

/// NLTK's `_match_enums`: from the last hypothesis word back, each takes the last unmatched
/// reference position holding the same string. Returns the (hypothesis, reference) position
/// pairs and what is left unmatched on each side.
fn match_enums(hyp: Enum, reference: Enum) -> (Vec<(usize, usize)>, Enum, Enum) {
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, (_, w)) in reference.iter().enumerate() {
        positions.entry(w.as_str()).or_default().push(j);
    }
    let mut matched = Vec::new();
    let mut hyp_used = vec![false; hyp.len()];
    let mut ref_used = vec![false; reference.len()];
    for i in (0..hyp.len()).rev() {
        if let Some(j) = positions.get_mut(hyp[i].1.as_str()).and_then(Vec::pop) {
            hyp_used[i] = true;
            ref_used[j] = true;
            matched.push((hyp[i].0, reference[j].0));
        }
    }
    let keep = |v: &Enum, used: &[bool]| -> Enum {
        v.iter()
            .zip(used)
            .filter(|(_, &u)| !u)
            .map(|(p, _)| p.clone())
            .collect()
    };
    let (h, r) = (keep(&hyp, &hyp_used), keep(&reference, &ref_used));
    (matched, h, r)
}

fn meteor(hyp: &[&str], reference: &[&str]) -> f64 {
    let (alpha, beta, gamma) = (0.9, 3.0, 0.5);
    let enumerate = |ws: &[&str]| -> Enum {
        ws.iter()
            .enumerate()
            .map(|(i, w)| (i, w.to_lowercase()))
            .collect()
    };
    let (exact, h, r) = match_enums(enumerate(hyp), enumerate(reference));
    let stems = |v: Enum| -> Enum {
        v.into_iter()
            .map(|(i, w)| (i, super::porter::stem(&w)))
            .collect()
    };
    let (stemmed, _, _) = match_enums(stems(h), stems(r));
    let mut matches: Vec<(usize, usize)> = exact.into_iter().chain(stemmed).collect();
    matches.sort_by_key(|m| m.0);
    let m = matches.len() as f64;
    if m == 0.0 || hyp.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let (p, rc) = (m / hyp.len() as f64, m / reference.len() as f64);
    let fmean = p * rc / (alpha * p + (1.0 - alpha) * rc);
    let chunks = 1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count();
    let penalty = gamma * (chunks as f64 / m).powf(beta);
    (1.0 - penalty) * fmean
}
