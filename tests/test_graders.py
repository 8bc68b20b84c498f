"""OpenAI's grader routes through the official `openai` client (`fine_tuning.alpha.graders`):
validate and run each grader type on the default model's server, bad graders refused with the
field named. The metrics' values are checked against their reference implementations in
crates/tandem-model/tests/graders.rs; here, the route shapes and a score_model that asks the
served model. Started by .ci/run.
"""
import openai
import pytest

# The server and client fixtures (module-scoped: one server for this file).
from test_openai import MODEL, client, server  # noqa: F401

STRING = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "ilike"}
SIMILAR = {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}",
           "reference": "{{item.answer}}", "evaluation_metric": "rouge_1"}


def test_validate_returns_the_grader(client):
    out = client.fine_tuning.alpha.graders.validate(grader=STRING)
    assert out.grader.type == "string_check" and out.grader.operation == "ilike"


def test_run_string_check_similarity_and_multi(client):
    run = client.fine_tuning.alpha.graders.run
    r = run(grader=STRING, model_sample="It is PARIS.", item={"answer": "paris"})
    assert r.reward == 1.0 and r.metadata.name == "exact" and r.metadata.type == "string_check"
    r = run(grader=SIMILAR, model_sample="hello there", item={"answer": "hello world"})
    assert abs(r.reward - 0.5) < 1e-12
    multi = {"type": "multi", "name": "both", "graders": {"exact": STRING, "sim": SIMILAR},
             "calculate_output": "0.5 * exact + 0.5 * sim"}
    r = run(grader=multi, model_sample="hello there", item={"answer": "hello world"})
    assert abs(r.reward - 0.25) < 1e-12 and r.sub_rewards == {"exact": 0.0, "sim": 0.5}


def test_meteor_aligns_stems(client):
    # NLTK's meteor_score with an empty WordNet gives 0.7653061224489797 (graders.rs).
    grader = {**SIMILAR, "evaluation_metric": "meteor"}
    assert client.fine_tuning.alpha.graders.validate(grader=grader).grader.evaluation_metric == "meteor"
    r = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="generously connected relational databases",
                                             item={"answer": "generous connections relate the database"})
    assert abs(r.reward - 0.7653061224489797) < 1e-12


def test_score_model_asks_the_served_model(client):
    judge = {"type": "score_model", "name": "judge", "model": MODEL, "range": [0, 10],
             "input": [{"role": "user", "content": "Reply with only the number 7. Answer: {{sample.output_text}}"}],
             "sampling_params": {"max_completions_tokens": 8}}
    r = client.fine_tuning.alpha.graders.run(grader=judge, model_sample="Paris", item={})
    assert 0 <= r.reward <= 10
    judge["model"] = "ft:nope"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.alpha.graders.run(grader=judge, model_sample="Paris", item={})
    assert "ft:nope" in e.value.body["message"]


@pytest.mark.parametrize("grader,field", [
    ({"type": "python", "name": "p", "source": "def grade(sample, item): return 1"}, "grader.type"),
    ({**STRING, "operation": "regex"}, "grader.operation"),
    ({**SIMILAR, "evaluation_metric": "cosine"}, "grader.evaluation_metric"),
    ({**STRING, "input": "{{answer}}"}, "grader.input"),
    ({"type": "multi", "name": "m", "graders": {"a": STRING}, "calculate_output": "a + b"}, "grader.calculate_output"),
])
def test_bad_graders_are_refused_naming_the_field(client, grader, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.alpha.graders.validate(grader=grader)
    assert e.value.body["param"] == field, e.value.body
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={})
