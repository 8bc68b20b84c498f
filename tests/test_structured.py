"""Structured outputs and tool calling end to end, against the real `tandem serve` on the default
model, with the official `openai` client: JSON schemas (validated by the `jsonschema` package),
`chat.completions.parse` with a Pydantic model, regex / choice / Lark / GBNF, tools forced and
chosen, streamed tool-call deltas, and a fine-tuning job that teaches the model to call a function.
Started by .ci/run: `python -m pytest tests/test_structured.py`.
"""
import concurrent.futures as cf
import json
import os
import re
import tempfile

import jsonschema
import openai
import pydantic
import pytest

from test_openai import MODEL, start, upload_training_file, wait_for, write_adapter

SCHEMAS = [
    # Nested objects, optional and required fields, bounded integers, enums.
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
                "required": ["kind"]},
        "nickname": {"type": "string", "maxLength": 12}},
     "required": ["name", "age", "pet"]},
    # Arrays with min/max items.
    {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10}, "minItems": 2, "maxItems": 4}},
     "required": ["colors", "scores"]},
    # $defs / $ref and anyOf.
    {"$defs": {"city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
                        "required": ["name", "country"]}},
     "type": "object", "properties": {
         "home": {"$ref": "#/$defs/city"},
         "next": {"anyOf": [{"$ref": "#/$defs/city"}, {"type": "null"}]}},
     "required": ["home", "next"]},
]
ASK = [{"role": "user", "content": "Describe a person, their colors and a city they like, as JSON."}]


@pytest.fixture(scope="module")
def server():
    proc, url = start()
    d = tempfile.mkdtemp()
    write_adapter(os.path.join(d, "rand"), False, 2)
    import httpx
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "rand", "lora_path": os.path.join(d, "rand")})
    assert r.status_code == 200, r.text
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def schema_format(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def test_every_output_validates_for_the_base_model_and_an_adapter_in_mixed_batches(client):
    jobs = []
    for schema in SCHEMAS:
        for model in (MODEL, "rand"):
            for temperature, seed in ((0, None), (1.0, 3), (1.0, 4)):
                jobs.append((schema, model, temperature, seed))

    def constrained(job):
        schema, model, temperature, seed = job
        r = client.chat.completions.create(model=model, messages=ASK, response_format=schema_format(schema),
                                           temperature=temperature, seed=seed, max_tokens=200)
        return r.choices[0]

    def free(i):
        return client.chat.completions.create(model=MODEL if i % 2 else "rand", messages=ASK, max_tokens=30,
                                              temperature=1.0, seed=i).choices[0]

    with cf.ThreadPoolExecutor(12) as pool:
        unconstrained = [pool.submit(free, i) for i in range(6)]
        results = list(pool.map(constrained, jobs))
    for (schema, model, temperature, seed), choice in zip(jobs, results):
        assert choice.finish_reason == "stop", (model, temperature, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert all(f.result().message.content for f in unconstrained)
    # Greedy output of a constrained request is the same alone as in those mixed batches.
    alone = client.chat.completions.create(model="rand", messages=ASK, response_format=schema_format(SCHEMAS[0]),
                                           temperature=0, max_tokens=200).choices[0].message.content
    assert alone == results[3].message.content


def test_json_object_and_non_strict_schemas_and_completions(client):
    # json_object: an object (a small model may run past max_tokens inside a string: then the
    # text so far, which opens one).
    for seed in (1, 2, 3):
        c = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=120,
                                           temperature=1.0, seed=seed).choices[0]
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["answer"]}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                       response_format=schema_format(schema, strict=False), max_tokens=40, temperature=0)
    assert json.loads(r.choices[0].message.content) == {"answer": "Paris"}
    # vLLM's fields, on completions, streamed: the stream assembles to the whole answer.
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=40, temperature=0, extra_body={"guided_json": schema})
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert json.loads(whole) == {"answer": "Paris"} and streamed == whole


class Pet(pydantic.BaseModel):
    kind: str
    legs: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    # Bounded: a 135M model repeats list items until max_tokens otherwise.
    pets: list[Pet] = pydantic.Field(max_length=3)


def test_parse_with_a_pydantic_model_returns_the_object(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Give me a person with pets."}],
                                      response_format=Person, max_tokens=200, temperature=0)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and all(isinstance(x, Pet) for x in p.pets), r.choices[0].message.content


def test_regex_choice_and_grammars_match(client):
    ask = lambda extra, **kw: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer."}],
                                                             max_tokens=30, extra_body=extra, **kw).choices[0].message.content
    for seed in (1, 2, 3):
        out = ask({"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} \d{1,3}"}}, temperature=1.0, seed=seed)
        assert re.fullmatch(r"[A-Z][a-z]{2,8} \d{1,3}", out), out
        assert ask({"guided_choice": ["yes", "no", "maybe so"]}, temperature=1.0, seed=seed) in ("yes", "no", "maybe so")
        lark = 'start: item | item "," item | item "," item "," item\nitem: "apple" | "pear" | NUM\nNUM: /[0-9]{1,2}/'
        out = ask({"structured_outputs": {"grammar": lark}}, temperature=1.0, seed=seed)
        items = out.split(",")
        assert len(items) <= 3 and all(i in ("apple", "pear") or re.fullmatch(r"[0-9]{1,2}", i) for i in items), out
        gbnf = 'root ::= answer "!"\nanswer ::= "yes" | "no" | [0-9]{1,3}'
        out = ask({"guided_grammar": gbnf}, temperature=1.0, seed=seed)
        assert re.fullmatch(r"(yes|no|[0-9]{1,3})!", out), out
    # n choices each keep to the constraint; logprobs and penalties work under it.
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer."}], max_tokens=30, n=4,
                                       temperature=1.0, seed=7, logprobs=True, top_logprobs=2, frequency_penalty=0.5,
                                       extra_body={"guided_choice": ["yes", "no", "maybe so"]})
    assert len(r.choices) == 4 and all(c.message.content in ("yes", "no", "maybe so") for c in r.choices)
    assert all(c.logprobs.content and all(t.logprob <= 0 for t in c.logprobs.content) for c in r.choices)


def test_bad_constraints_are_400s_naming_the_field(client):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": 'root ::= "open'}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
    # A constraint that cannot finish within max_tokens ends by length with the text so far.
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body={"guided_regex": "[a-z]{40}"})
    assert r.choices[0].finish_reason == "length" and re.fullmatch("[a-z]+", r.choices[0].message.content)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls, names=None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function"
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_required_and_named_tool_choice_always_yield_valid_calls(client):
    q = [{"role": "user", "content": "What's the weather in Paris, and the time in Tokyo?"}]
    for model in (MODEL, "rand"):
        for seed in (None, 5, 6):
            t = 0 if seed is None else 1.0
            r = client.chat.completions.create(model=model, messages=q, tools=TOOLS, tool_choice="required",
                                               temperature=t, seed=seed, max_tokens=150)
            m = r.choices[0].message
            check_calls(m.tool_calls)
            assert m.content is None
            named = client.chat.completions.create(model=model, messages=q, tools=TOOLS, temperature=t, seed=seed, max_tokens=80,
                                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
            assert named.choices[0].finish_reason == "tool_calls"
            check_calls(named.choices[0].message.tool_calls, {"get_time"})
            assert len(named.choices[0].message.tool_calls) == 1
    one = client.chat.completions.create(model=MODEL, messages=q, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=150, temperature=0)
    assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"


def test_a_tool_round_trip_and_streamed_deltas_assemble_to_the_message(client):
    q = [{"role": "user", "content": "What's the weather in Paris?"}]
    kw = dict(model=MODEL, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0)
    r = client.chat.completions.create(messages=q, **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    # Streamed: index, id and name first, then the arguments in fragments as they are generated;
    # they assemble to the same call.
    calls, finish, fragments = {}, None, 0
    for chunk in client.chat.completions.create(messages=q, stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert not c["arguments"], "the id comes first"
                c["id"] = d.id
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
            fragments += bool(d.function and d.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == (call.function.name, json.loads(call.function.arguments))
    assert calls[0]["id"].startswith("call_") and fragments > 1
    # The tool's result goes back; the model answers in text (tool_choice auto).
    history = q + [r.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    # vLLM's /tokenize with tools: the prompt the chat request saw.
    import httpx
    base = client.base_url.scheme + "://" + client.base_url.netloc.decode()
    tok = httpx.post(base + "/tokenize", json={"model": MODEL, "messages": history, "tools": [WEATHER]}).json()
    assert tok["count"] == final.usage.prompt_tokens
    # tool_choice none: the tools are not offered and nothing is parsed.
    none = client.chat.completions.create(model=MODEL, messages=q, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert none.choices[0].message.content and none.choices[0].message.tool_calls is None


def test_bad_tools_are_400s(client):
    q = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(tools=[{"type": "retrieval"}]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools"),
        (dict(tools=[WEATHER, WEATHER]), "tools"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=q, max_tokens=5, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


TRAIN_CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Dublin", "Vienna", "Prague",
                "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Nairobi", "Lisbon", "Athens", "Warsaw", "Havana", "Manila"]
QUESTIONS = ["What's the weather in {}?", "Is it raining in {} right now?", "How hot is it in {} today?", "Tell me the weather for {}."]
SIMPLE_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_fine_tuning_job_teaches_the_model_to_call_a_function(client):
    """Sixteen tool-call examples in OpenAI's format, one epoch (six epochs, the "auto" of an
    earlier rule, taught it too, in six times the CI time): on held-out cities the fine-tuned model calls
    get_weather with tool_choice auto; the base model does not."""
    lines = [{"messages": [{"role": "user", "content": QUESTIONS[i % 4].format(city)},
                           {"role": "assistant", "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                               "name": "get_weather", "arguments": json.dumps({"city": city})}}]}],
              "tools": [SIMPLE_WEATHER]} for i, city in enumerate(TRAIN_CITIES[:16])]
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload_training_file(client, lines),
                                         hyperparameters={"n_epochs": 1})
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=1500)
    assert done.status == "succeeded", done.error
    for city in ("Helsinki", "Bangkok", "Denver"):
        q = [{"role": "user", "content": f"What's the weather like in {city}?"}]
        ask = lambda model: client.chat.completions.create(model=model, messages=q, tools=[SIMPLE_WEATHER], tool_choice="auto",
                                                           max_tokens=40, temperature=0).choices[0]
        tuned, base = ask(done.fine_tuned_model), ask(MODEL)
        assert tuned.finish_reason == "tool_calls", tuned.message
        assert tuned.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(tuned.message.tool_calls[0].function.arguments) == {"city": city}
        assert base.message.tool_calls is None, base.message


class GetWeather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    unit: str = pydantic.Field(pattern="^(c|f)$")


class Capital(pydantic.BaseModel):
    capital: str = pydantic.Field(max_length=20)
    population_millions: float


def test_the_clients_parse_and_stream_helpers(client):
    """What users of the openai package write: pydantic_function_tool with parse(), and the
    streaming helper with a Pydantic response_format and with a named tool."""
    q = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.parse(model=MODEL, messages=q, tools=[openai.pydantic_function_tool(GetWeather)],
                                      tool_choice="required", max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather)
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                        response_format=Capital, max_tokens=60, temperature=0) as s:
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Capital)
    with client.chat.completions.stream(model=MODEL, messages=q, tools=[openai.pydantic_function_tool(GetWeather)], max_tokens=60,
                                        tool_choice={"type": "function", "function": {"name": "GetWeather"}}) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather)
