//! OpenAI's graders on fixed cases: string checks by hand, text-similarity metrics against
//! reference values from their usual implementations (rapidfuzz 3.14.6 `fuzz.ratio / 100`, NLTK
//! 3.9.1 `sentence_bleu` / `sentence_gleu` on whitespace tokens, rouge-score 0.1.2 F-measures;
//! printed by the script in this file's last comment), multi formulas, score_model's number
//! parsing and range, templates, and bad graders refused naming the field.

use serde_json::{json, Value};
use tandem_model::graders::{render, similarity, Grader, ModelCall};

struct NoModel;
impl ModelCall for NoModel {
    fn call(&self, _: &str, _: &[(String, String)], _: &Value) -> Result<String, String> {
        Err("no model".into())
    }
}

/// Answers with a fixed text, recording what it was asked.
struct Fixed(&'static str, std::cell::RefCell<Vec<(String, String)>>);
impl ModelCall for Fixed {
    fn call(&self, model: &str, msgs: &[(String, String)], _: &Value) -> Result<String, String> {
        assert_eq!(model, "judge");
        *self.1.borrow_mut() = msgs.to_vec();
        Ok(self.0.to_string())
    }
}

fn grade(g: Value, sample: &str, item: Value) -> f64 {
    Grader::parse(&g, "grader.")
        .unwrap()
        .grade(sample, &item, &NoModel)
        .unwrap()
        .reward
}

#[test]
fn string_checks() {
    let g = |op: &str| {
        json!({"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}", "operation": op})
    };
    let item = json!({"answer": "Paris"});
    assert_eq!(grade(g("eq"), "Paris", item.clone()), 1.0);
    assert_eq!(grade(g("eq"), "paris", item.clone()), 0.0);
    assert_eq!(grade(g("ne"), "Rome", item.clone()), 1.0);
    assert_eq!(grade(g("like"), "It is Paris.", item.clone()), 1.0);
    assert_eq!(grade(g("like"), "It is PARIS.", item.clone()), 0.0);
    assert_eq!(grade(g("ilike"), "It is PARIS.", item), 1.0);
}

const CASES: &[(&str, &str, [f64; 10])] = &[
    // fuzzy, bleu, gleu, rouge_1..5, rouge_l, meteor (NLTK, no WordNet)
    (
        "the cat sat on the mat today",
        "the cat is sitting on the mat",
        [
            0.736842105263158,
            0.0,
            0.409090909090909,
            0.714285714285714,
            0.5,
            0.2,
            0.0,
            0.0,
            0.714285714285714,
            0.6914285714285714,
        ],
    ),
    (
        "the quick brown fox jumps over the lazy dog",
        "the quick brown dog jumps over the lazy fox",
        [
            0.906976744186047,
            0.459661357612459,
            0.6,
            1.0,
            0.625,
            0.428571428571429,
            0.166666666666667,
            0.0,
            0.777777777777778,
            0.9561042524005487,
        ],
    ),
    (
        "Paris is the capital of France.",
        "The capital of France is Paris.",
        [
            0.67741935483871,
            0.0,
            0.222222222222222,
            1.0,
            0.6,
            0.5,
            0.333333333333333,
            0.0,
            0.666666666666667,
            0.625,
        ],
    ),
    (
        "hello",
        "hello world",
        [
            0.625,
            0.0,
            0.333333333333333,
            0.666666666666667,
            0.0,
            0.0,
            0.0,
            0.0,
            0.666666666666667,
            0.2631578947368421,
        ],
    ),
    (
        "a b c d e f",
        "a b c d e f",
        [
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            0.9976851851851852,
        ],
    ),
];

#[test]
fn text_similarity_metrics_equal_their_usual_implementations() {
    for (hyp, reference, want) in CASES {
        for (metric, w) in similarity::METRICS.iter().zip(want) {
            let got = similarity::score(metric, hyp, reference).unwrap();
            // NLTK's BLEU gives ~1e-78 rather than 0 when an order has no match.
            assert!(
                (got - w).abs() < 1e-12,
                "{metric}({hyp:?}, {reference:?}) = {got}, want {w}"
            );
            let g = json!({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                "reference": "{{item.ref}}", "evaluation_metric": metric});
            assert_eq!(grade(g, hyp, json!({"ref": reference})), got);
        }
    }
}

#[test]
fn multi_combines_by_formula_and_score_model_reads_a_number() {
    let g = json!({"type": "multi", "name": "m", "calculate_output": "0.25 * exact + 0.75 * max(sim, 0.5) ^ 2",
        "graders": {
            "exact": {"type": "string_check", "name": "e", "input": "{{sample.output_text}}", "reference": "{{item.a}}", "operation": "eq"},
            "sim": {"type": "text_similarity", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.a}}", "evaluation_metric": "rouge_1"}}});
    let parsed = Grader::parse(&g, "grader.").unwrap();
    let r = parsed
        .grade("hello there", &json!({"a": "hello world"}), &NoModel)
        .unwrap();
    let sim = 0.5; // rouge_1 F of "hello there" vs "hello world"
    assert!((r.reward - 0.75 * f64::max(sim, 0.5).powi(2)).abs() < 1e-12);
    assert_eq!(r.sub_rewards["exact"], 0.0);
    assert_eq!(r.sub_rewards["sim"], sim);
    let judge = json!({"type": "score_model", "name": "j", "model": "judge", "range": [0, 10],
        "input": [{"role": "user", "content": "Rate {{sample.output_text}} for {{item.q}}"}]});
    let fixed = Fixed("I'd say 7.5/10.", Default::default());
    let g = Grader::parse(&judge, "grader.").unwrap();
    assert_eq!(
        g.grade("Paris", &json!({"q": "capital?"}), &fixed)
            .unwrap()
            .reward,
        7.5
    );
    assert_eq!(
        fixed.1.borrow()[0],
        ("user".to_string(), "Rate Paris for capital?".to_string())
    );
    let over = Fixed("42", Default::default());
    assert_eq!(
        g.grade("x", &json!({"q": "?"}), &over).unwrap().reward,
        10.0
    );
    let none = Fixed("no idea", Default::default());
    assert_eq!(g.grade("x", &json!({"q": "?"}), &none).unwrap().reward, 0.0);
}

#[test]
fn templates_read_the_item_and_the_sample() {
    let item = json!({"a": {"b": "deep"}, "n": 3});
    assert_eq!(
        render(
            "{{ item.a.b }}/{{item.n}}/{{sample.output_text}}",
            "out",
            &item
        )
        .unwrap(),
        "deep/3/out"
    );
    assert_eq!(
        render("{{sample.output_json.k}}", r#"{"k": "v"}"#, &item).unwrap(),
        "v"
    );
    assert!(render("{{item.missing}}", "", &item)
        .unwrap_err()
        .contains("no such field"));
    assert!(render("{{sample.output_json.k}}", "not json", &item)
        .unwrap_err()
        .contains("not JSON"));
}

/// METEOR where stems align what exact matching does not, and where nothing aligns: NLTK's
/// `meteor_score` with an empty WordNet (see the end of this file).
#[test]
fn meteor_equals_nltk_without_wordnet() {
    let cases = [
        (
            "The cats were running quickly through the gardens",
            "a cat runs quick through its garden",
            0.28169014084507044,
        ),
        (
            "generously connected relational databases",
            "generous connections relate the database",
            0.7653061224489797,
        ),
        ("", "something", 0.0),
        ("nothing in common", "entirely different words", 0.0),
    ];
    for (hyp, reference, want) in cases {
        let got = similarity::score("meteor", hyp, reference).unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "meteor({hyp:?}, {reference:?}) = {got}, want {want}"
        );
    }
}

/// NLTK's Porter stemmer (its default NLTK_EXTENSIONS mode) on 2,799 words: the repository's
/// documentation's words and the algorithm's classic examples, stems printed by NLTK 3.10.4.
#[test]
fn porter_stems_equal_nltk() {
    let table = include_str!("data/porter_nltk.tsv");
    let mut n = 0;
    for line in table.lines().filter(|l| !l.starts_with('#')) {
        let (word, want) = line.split_once('\t').unwrap();
        assert_eq!(
            tandem_model::graders::porter::stem(word),
            want,
            "stem({word:?})"
        );
        n += 1;
    }
    assert!(n > 2000, "{n} words");
}

#[test]
fn bad_graders_name_the_field() {
    let sc = |extra: Value| {
        let mut g = json!({"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"});
        g.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        g
    };
    let cases = [
        (
            json!({"type": "python", "source": "def grade(): return 1"}),
            "grader.type",
        ),
        (json!({"type": "nope"}), "grader.type"),
        (json!({"name": "x"}), "grader.type"),
        (sc(json!({"operation": "regex"})), "grader.operation"),
        (sc(json!({"input": "{{model.output}}"})), "grader.input"),
        (sc(json!({"reference": 3})), "grader.reference"),
        (
            json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine"}),
            "grader.evaluation_metric",
        ),
        (
            json!({"type": "text_similarity", "input": "a", "reference": "b"}),
            "grader.evaluation_metric",
        ),
        (
            json!({"type": "score_model", "model": "m", "input": "hi"}),
            "grader.input",
        ),
        (
            json!({"type": "score_model", "model": "m", "input": [], "range": [1, 0]}),
            "grader.range",
        ),
        (
            json!({"type": "multi", "graders": {"a": sc(json!({}))}, "calculate_output": "a + b"}),
            "grader.calculate_output",
        ),
        (
            json!({"type": "multi", "graders": {"a": sc(json!({}))}, "calculate_output": "a +"}),
            "grader.calculate_output",
        ),
        (
            json!({"type": "multi", "graders": {"a": sc(json!({"operation": "x"}))}, "calculate_output": "a"}),
            "grader.graders.a.operation",
        ),
    ];
    for (g, field) in cases {
        let (f, msg) = Grader::parse(&g, "grader.").unwrap_err();
        assert_eq!(f, field, "{g}: {msg}");
    }
}

// The reference values above, printed with rapidfuzz==3.14.6 nltk==3.9.1 rouge-score==0.1.2:
//   from nltk.translate.bleu_score import sentence_bleu
//   from nltk.translate.gleu_score import sentence_gleu
//   from rouge_score import rouge_scorer
//   from rapidfuzz import fuzz
//   sc = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rouge3', 'rouge4', 'rouge5', 'rougeL'])
//   for h, r in cases:
//       print(fuzz.ratio(h, r) / 100, sentence_bleu([r.split()], h.split()),
//             sentence_gleu([r.split()], h.split()), [v.fmeasure for v in sc.score(r, h).values()])
// METEOR with nltk==3.10.4 and an empty WordNet (tandem does not ship WordNet's synonyms):
//   from nltk.translate.meteor_score import meteor_score
//   class NoWordNet:
//       def synsets(self, w): return []
//   meteor_score([r.split()], h.split(), wordnet=NoWordNet())
