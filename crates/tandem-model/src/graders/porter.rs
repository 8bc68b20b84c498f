//! The Porter stemmer as NLTK's `PorterStemmer()` runs it (its default `NLTK_EXTENSIONS`
//! mode: the original algorithm with NLTK's fixes and its small table of irregular forms),
//! for METEOR's stem stage. Written after NLTK's `nltk/stem/porter.py` rule for rule; the
//! tests hold NLTK's stems of a few thousand words. No crate implements this variant
//! (`rust-stemmers` has Snowball's English, Porter2, which stems differently).

const VOWELS: [char; 5] = ['a', 'e', 'i', 'o', 'u'];

fn is_vowel(c: char) -> bool {
    VOWELS.contains(&c)
}

/// NLTK's `_is_consonant`: a `y` after a consonant is a vowel, alternating along runs of `y`.
fn is_consonant(w: &[char], mut i: usize) -> bool {
    if is_vowel(w[i]) {
        return false;
    }
    if w[i] == 'y' {
        let mut negate = false;
        while i > 0 && w[i] == 'y' {
            negate = !negate;
            i -= 1;
        }
        // A consonant unless negated by an odd run of `y`.
        return is_vowel(w[i]) == negate;
    }
    true
}

fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

/// m: the number of vowel-consonant sequences.
fn measure(stem: &[char]) -> usize {
    let f = consonant_flags(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[char]) -> bool {
    !consonant_flags(stem).iter().all(|&c| c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let s: Vec<char> = suffix.chars().collect();
    w.len() >= s.len() && w[w.len() - s.len()..] == s[..]
}

fn strip<'a>(w: &'a [char], suffix: &str) -> &'a [char] {
    &w[..w.len() - suffix.chars().count()]
}

fn join(stem: &[char], tail: &str) -> Vec<char> {
    stem.iter().copied().chain(tail.chars()).collect()
}

type Cond<'a> = &'a dyn Fn(&[char]) -> bool;

/// The first rule whose suffix ends the word applies: its replacement if its condition
/// holds on the stem, else the word unchanged. `*d` means a double consonant.
fn apply_rules(w: &[char], rules: &[(&str, &str, Option<Cond>)]) -> Vec<char> {
    for (suffix, replacement, cond) in rules {
        let holds = |stem: &[char]| cond.as_ref().is_none_or(|c| c(stem));
        if *suffix == "*d" && ends_double_consonant(w) {
            let stem = &w[..w.len() - 2];
            return if holds(stem) {
                join(stem, replacement)
            } else {
                w.to_vec()
            };
        }
        if ends_with(w, suffix) {
            let stem = strip(w, suffix);
            return if holds(stem) {
                join(stem, replacement)
            } else {
                w.to_vec()
            };
        }
    }
    w.to_vec()
}

fn positive(stem: &[char]) -> bool {
    measure(stem) > 0
}

fn step1a(w: &[char]) -> Vec<char> {
    if ends_with(w, "ies") && w.len() == 4 {
        return join(strip(w, "ies"), "ie");
    }
    apply_rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: &[char]) -> Vec<char> {
    if ends_with(w, "ied") {
        let tail = if w.len() == 4 { "ie" } else { "i" };
        return join(strip(w, "ied"), tail);
    }
    if ends_with(w, "eed") {
        let stem = strip(w, "eed");
        return if measure(stem) > 0 {
            join(stem, "ee")
        } else {
            w.to_vec()
        };
    }
    let Some(inter) = ["ed", "ing"]
        .iter()
        .filter(|s| ends_with(w, s))
        .map(|s| strip(w, s))
        .find(|stem| contains_vowel(stem))
    else {
        return w.to_vec();
    };
    let last = inter[inter.len() - 1];
    let last_s = last.to_string();
    let not_lsz: Cond = &|_| !matches!(last, 'l' | 's' | 'z');
    let add_e: Cond = &|stem| measure(stem) == 1 && ends_cvc(stem);
    apply_rules(
        inter,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", &last_s, Some(not_lsz)),
            ("", "e", Some(add_e)),
        ],
    )
}

fn step1c(w: &[char]) -> Vec<char> {
    let cond: Cond = &|stem| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[("y", "i", Some(cond))])
}

fn step2(w: &[char]) -> Vec<char> {
    if ends_with(w, "alli") && positive(strip(w, "alli")) {
        return step2(&join(strip(w, "alli"), "al"));
    }
    let p: Cond = &positive;
    let logi: Cond = &|_| positive(&w[..w.len() - 3]);
    let mut rules: Vec<(&str, &str, Option<Cond>)> = [
        ("ational", "ate"),
        ("tional", "tion"),
        ("enci", "ence"),
        ("anci", "ance"),
        ("izer", "ize"),
        ("bli", "ble"),
        ("alli", "al"),
        ("entli", "ent"),
        ("eli", "e"),
        ("ousli", "ous"),
        ("ization", "ize"),
        ("ation", "ate"),
        ("ator", "ate"),
        ("alism", "al"),
        ("iveness", "ive"),
        ("fulness", "ful"),
        ("ousness", "ous"),
        ("aliti", "al"),
        ("iviti", "ive"),
        ("biliti", "ble"),
        ("fulli", "ful"),
    ]
    .into_iter()
    .map(|(s, r)| (s, r, Some(p)))
    .collect();
    rules.push(("logi", "log", Some(logi)));
    apply_rules(w, &rules)
}

fn step3(w: &[char]) -> Vec<char> {
    let p: Cond = &positive;
    let rules: Vec<(&str, &str, Option<Cond>)> = [
        ("icate", "ic"),
        ("ative", ""),
        ("alize", "al"),
        ("iciti", "ic"),
        ("ical", "ic"),
        ("ful", ""),
        ("ness", ""),
    ]
    .into_iter()
    .map(|(s, r)| (s, r, Some(p)))
    .collect();
    apply_rules(w, &rules)
}

fn step4(w: &[char]) -> Vec<char> {
    let gt1: Cond = &|stem| measure(stem) > 1;
    let ion: Cond = &|stem| measure(stem) > 1 && matches!(stem.last(), Some('s' | 't'));
    let rules: Vec<(&str, &str, Option<Cond>)> = [
        "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
        "ou", "ism", "ate", "iti", "ous", "ive", "ize",
    ]
    .into_iter()
    .map(|s| (s, "", Some(if s == "ion" { ion } else { gt1 })))
    .collect();
    apply_rules(w, &rules)
}

fn step5a(w: &[char]) -> Vec<char> {
    if ends_with(w, "e") {
        let stem = strip(w, "e");
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w.to_vec()
}

fn step5b(w: &[char]) -> Vec<char> {
    let cond: Cond = &|_| measure(&w[..w.len() - 1]) > 1;
    apply_rules(w, &[("ll", "l", Some(cond))])
}

/// NLTK's irregular forms.
fn irregular(w: &str) -> Option<&'static str> {
    Some(match w {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

/// `PorterStemmer().stem(word)`: lowercased, then stemmed.
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(s) = irregular(&lower) {
        return s.to_string();
    }
    if word.chars().count() <= 2 {
        return lower;
    }
    let w: Vec<char> = lower.chars().collect();
    let w = step1a(&w);
    let w = step1b(&w);
    let w = step1c(&w);
    let w = step2(&w);
    let w = step3(&w);
    let w = step4(&w);
    let w = step5a(&w);
    let w = step5b(&w);
    w.into_iter().collect()
}
