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
//! `meteor` (NLTK's needs WordNet synonyms and a stemmer) and `cosine` (embeddings) are not
//! offered yet; validation refuses them by name.

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
];

/// The score of `hyp` against `reference` under `metric` (one of `METRICS`).
pub fn score(metric: &str, hyp: &str, reference: &str) -> Option<f64> {
    Some(match metric {
        "fuzzy_match" => fuzzy_ratio(hyp, reference),
        "bleu" => bleu(&words(hyp), &words(reference)),
        "gleu" => gleu(&words(hyp), &words(reference)),
        "rouge_l" => rouge_l(&rouge_tokens(hyp), &rouge_tokens(reference)),
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
