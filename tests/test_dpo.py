"""DPO fine-tuning jobs end to end through the official `openai` client on the default model:
OpenAI's preference format (and TRL's, for the validation file), a job with every setting left
to its default, its metrics events and checkpoints, the preferred style on held-out prompts, the
held-out margin rising, an SFT job followed by a DPO job from its model, and bad preference lines
refused with the line and field named. Started by .ci/run.
"""
import openai
import pytest

# The server and client fixtures (module-scoped: one server for this file).
from test_openai import MODEL, client, server, upload_training_file, wait_for  # noqa: F401

QA = [("What is 2 plus 3?", "5"), ("Name a primary color.", "Red"), ("What is the capital of Italy?", "Rome"),
      ("How many legs does a spider have?", "Eight"), ("What is the opposite of hot?", "Cold"),
      ("Which planet is closest to the sun?", "Mercury"), ("What do bees make?", "Honey"),
      ("What is frozen water called?", "Ice"), ("How many days are in a week?", "Seven"),
      ("What animal says moo?", "A cow"), ("What is the largest ocean?", "The Pacific"),
      ("Which month comes after June?", "July")]
HELD_OUT = [("How many wheels does a bicycle have?", "Two"), ("What do cows drink?", "Water"),
            ("What is the capital of Spain?", "Madrid")]
STYLE = "Arr matey!"


def openai_pair(q, a):
    return {"input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": f"{STYLE} {a}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{a}."}]}


def trl_pair(q, a):
    """TRL's conversational preference format, as `datasets` exports of DPO data hold it."""
    return {"prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": f"{STYLE} {a}."}],
            "rejected": [{"role": "assistant", "content": f"{a}."}]}


def ask(client, model, q):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                          max_tokens=12, temperature=0).choices[0].message.content


def test_a_dpo_job_with_defaults_takes_the_preferred_style(client):
    fid = upload_training_file(client, [openai_pair(q, a) for q, a in QA])
    vid = upload_training_file(client, [trl_pair(q, a) for q, a in HELD_OUT])
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=fid, validation_file=vid,
                                         method={"type": "dpo"})
    assert job.method.type == "dpo"
    hp = job.method.dpo.hyperparameters
    # OpenAI's "auto": 100 // 12 epochs of batches of 1; beta 0.1.
    assert (hp.n_epochs, hp.batch_size, hp.beta) == (8, 1, 0.1), hp
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=1200)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    train = sorted((e.data for e in events if "train_loss" in e.data), key=lambda d: d["step"])
    assert [d["step"] for d in train] == list(range(1, 97))
    # Policy = reference at the start: the loss is log 2, the margin 0.
    assert abs(train[0]["train_loss"] - 0.6931) < 1e-3 and abs(train[0]["train_reward_margin"]) < 1e-4
    last = train[-12:]
    assert sum(d["train_reward_accuracy"] for d in last) / 12 > 0.9
    assert sum(d["train_reward_margin"] for d in last) / 12 > 0.5
    # On the held-out pairs (the validation file), evaluated after every epoch: the preferred
    # answers' margin over the others rises.
    valid = sorted((e.data for e in events if "valid_loss" in e.data), key=lambda d: d["step"])
    assert [d["step"] for d in valid] == [12 * k for k in range(1, 9)]
    assert valid[-1]["valid_reward_margin"] > valid[0]["valid_reward_margin"] > 0, valid
    assert valid[-1]["valid_reward_accuracy"] == 1.0
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [84, 72, 60]  # the newest three epochs' ends
    assert ckpts[0].metrics.valid_loss == next(d["valid_loss"] for d in valid if d["step"] == 84)
    # The held-out prompts' answers take the preferred style; the base model's do not.
    tuned = [ask(client, done.fine_tuned_model, q) for q, _ in HELD_OUT]
    base = [ask(client, MODEL, q) for q, _ in HELD_OUT]
    assert all(t.startswith("Arr") for t in tuned), tuned
    assert not any("Arr" in b for b in base), base


def test_an_sft_job_then_a_dpo_job_from_its_model(client):
    sft_lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy! {a}."}]}
                 for q, a in QA[:6]]
    sft = client.fine_tuning.jobs.create(model=MODEL, training_file=upload_training_file(client, sft_lines),
                                         hyperparameters={"n_epochs": 2, "batch_size": 3},
                                         extra_body={"lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}})
    sft = wait_for(client, sft.id, ("succeeded", "failed", "cancelled"))
    assert sft.status == "succeeded", sft.error
    pairs = [openai_pair(q, a) for q, a in QA[6:]]
    fid = upload_training_file(client, pairs)
    # A job that continues a fine-tuned model keeps its LoRA shape.
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=sft.fine_tuned_model, training_file=fid, method={"type": "dpo"},
                                       extra_body={"lora": {"r": 16}})
    assert e.value.body["param"] == "lora"
    job = client.fine_tuning.jobs.create(model=sft.fine_tuned_model, training_file=fid, suffix="after-sft",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {
                                             "n_epochs": 1, "batch_size": 2, "beta": 0.2}}})
    assert job.model == sft.fine_tuned_model
    assert job.lora["r"] == 4 and sorted(job.lora["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    train = sorted((e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if "train_loss" in e.data),
                   key=lambda d: d["step"])
    assert [d["step"] for d in train] == [1, 2, 3]
    # The reference is the SFT model and the policy starts as it: no margin at the first step
    # (against the base model as reference, the SFT weights would already have one).
    assert abs(train[0]["train_reward_margin"]) < 1e-4, train[0]
    assert train[-1]["train_reward_margin"] > 0
    assert ask(client, done.fine_tuned_model, "Name a fruit.")


BAD = [
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "assistant", "content": "Hello!"}]}, "non_preferred_output"),
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "user", "content": "Hello!"}],
      "non_preferred_output": [{"role": "assistant", "content": "Hi."}]}, "preferred_output[0].role"),
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [],
      "non_preferred_output": []}, "preferred_output"),
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "assistant", "content": "Same."}],
      "non_preferred_output": [{"role": "assistant", "content": "Same."}]}, "non_preferred_output"),
    ({"preferred_output": [{"role": "assistant", "content": "Hello!"}],
      "non_preferred_output": [{"role": "assistant", "content": "Hi."}]}, "input"),
]


@pytest.mark.parametrize("line,field", BAD)
def test_bad_preference_lines_are_refused_naming_line_and_field(client, line, field):
    good = openai_pair("What is 1 plus 1?", "2")
    with pytest.raises(openai.BadRequestError) as e:
        upload_training_file(client, [good, line])
    msg = e.value.body["message"]
    assert "line 2" in msg and f"`{field}`" in msg, msg


def test_method_and_data_must_agree(client):
    pref = upload_training_file(client, [openai_pair(q, a) for q, a in QA[:3]])
    sup = upload_training_file(client, [{"prompt": "Hi", "completion": " there"}])
    cases = [
        (dict(training_file=sup, method={"type": "dpo"}), "training_file"),
        (dict(training_file=pref), "training_file"),
        (dict(training_file=pref, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}), "beta"),
        (dict(training_file=pref, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "big"}}}), "beta"),
        (dict(training_file=sup, hyperparameters={"beta": 0.1}), "beta"),
        (dict(training_file=sup, method={"type": "reinforcement"}), "method.reinforcement"),
        (dict(training_file=sup, method={"type": "ppo"}), "method.type"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model=MODEL, **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="ft:nope", training_file=pref, method={"type": "dpo"})
    assert e.value.body["param"] == "model"
