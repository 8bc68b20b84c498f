"""Reinforcement fine-tuning jobs end to end through the official `openai` client on the default
model: OpenAI's `reinforcement` method with a `text_similarity` grader (fuzzy_match against each
line's `answer`), answers sampled by the same engine that trains, the held-out prompts' mean
reward (scored by the grader route) rising well above the base model's, events carrying the
rewards, the model served at once; bad jobs refused with the field named. Started by .ci/run.
"""
import openai
import pytest

from test_openai import MODEL, client, server, upload_training_file, wait_for  # noqa: F401

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing")]
HELD_OUT = [("England", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna")]
GRADER = {"type": "text_similarity", "name": "close_to_answer", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}


def line(country, capital):
    return {"messages": [{"role": "user", "content": f"What is the capital of {country}?"}],
            "answer": capital}


def held_out_reward(client, model):
    """Mean grader reward of answers sampled as the job samples them (temperature 1, four per
    held-out prompt, seeded), each scored by the grader route."""
    rewards = []
    for country, capital in HELD_OUT:
        out = client.chat.completions.create(
            model=model, messages=line(country, capital)["messages"], max_tokens=32, temperature=1,
            n=4, seed=11)
        for c in out.choices:
            run = client.fine_tuning.alpha.graders.run(grader=GRADER, model_sample=c.message.content,
                                                        item={"answer": capital})
            rewards.append(run.reward)
    return sum(rewards) / len(rewards)


def test_a_reinforcement_job_raises_the_held_out_reward(client):
    fid = upload_training_file(client, [line(c, a) for c, a in CAPITALS])
    vid = upload_training_file(client, [line(c, a) for c, a in HELD_OUT])
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=fid, validation_file=vid,
        method={"type": "reinforcement", "reinforcement": {
            "grader": GRADER,
            # The learning rate, group size and evaluation schedule stay "auto".
            "hyperparameters": {"n_epochs": 2, "batch_size": 2, "max_completion_tokens": 32}}})
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.type == "text_similarity"
    hp = job.method.reinforcement.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.compute_multiplier, hp.eval_interval) == (2, 2, 1.0, 4), hp
    base = held_out_reward(client, MODEL)
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=1200)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    train = sorted((e.data for e in events if "train_mean_reward" in e.data), key=lambda d: d["step"])
    assert [d["step"] for d in train] == list(range(1, 9))
    # Four answers sampled per prompt, two prompts per step.
    assert all(d["train_answers"] == 8 and d["train_tokens_sampled"] > 0 for d in train), train
    first, last = sum(d["train_mean_reward"] for d in train[:2]), sum(d["train_mean_reward"] for d in train[-2:])
    assert last > first, train
    # Evaluated on the validation prompts before the first step and after every epoch.
    valid = sorted((e.data for e in events if "valid_mean_reward" in e.data), key=lambda d: d["step"])
    assert [d["step"] for d in valid] == [0, 4, 8], valid
    assert valid[-1]["valid_mean_reward"] > valid[0]["valid_mean_reward"], valid
    # The job's model is served, and its held-out answers score well above the base model's.
    tuned = held_out_reward(client, done.fine_tuned_model)
    print("held-out mean reward: base", base, "tuned", tuned)
    assert tuned > base + 0.08 and tuned > 1.5 * base, (base, tuned)


def test_bad_reinforcement_jobs_are_refused(client):
    fid = upload_training_file(client, [line(c, a) for c, a in CAPITALS[:2]])
    cases = [
        ({"type": "reinforcement", "reinforcement": {}}, "method.reinforcement.grader"),
        ({"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "name": "p", "source": "x"}}},
         "method.reinforcement.grader.type"),
        ({"type": "reinforcement", "reinforcement": {"grader": dict(GRADER, evaluation_metric="cider")}},
         "method.reinforcement.grader.evaluation_metric"),
        ({"type": "reinforcement", "reinforcement": {"grader": {"type": "score_model", "name": "s",
          "model": "no-such-model", "input": [{"role": "user", "content": "{{sample.output_text}}"}]}}},
         "method.reinforcement.grader.model"),
        ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 0}}},
         "compute_multiplier"),
    ]
    for method, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model=MODEL, training_file=fid, method=method)
        assert e.value.body["param"] == param, (param, e.value.body)
    # A file of prompts is not supervised data, and preference pairs are not prompts.
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=fid)
    assert "reinforcement" in e.value.body["message"]
    pairs = upload_training_file(client, [{"input": {"messages": [{"role": "user", "content": "Hi"}]},
                                           "preferred_output": [{"role": "assistant", "content": "Hello"}],
                                           "non_preferred_output": [{"role": "assistant", "content": "Go"}]}])
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=pairs,
                                       method={"type": "reinforcement", "reinforcement": {"grader": GRADER}})
    assert e.value.body["param"] == "training_file"
