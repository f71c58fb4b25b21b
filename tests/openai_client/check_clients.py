"""Drives a running wick dev server with the official Python clients, unchanged.

Run by tests/server_python_clients.rs inside a throwaway venv. Environment:
  TEST_BASE_URL              http://127.0.0.1:PORT (the server)
  TEST_API_KEY               the server's bearer key
  TEST_MODEL                 the served model name
  RUNPOD_ENDPOINT_BASE_URL   TEST_BASE_URL + "/v2" (read by `runpod` at import)
Exits non-zero on the first failed check; prints one line per passed group.
"""

import os
import sys

BASE = os.environ["TEST_BASE_URL"]
KEY = os.environ["TEST_API_KEY"]
MODEL = os.environ["TEST_MODEL"]


def check_openai():
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=120)

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models

    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, seed=3
    )
    assert plain.object == "chat.completion", plain
    text = plain.choices[0].message.content
    assert isinstance(text, str), plain
    assert plain.usage.completion_tokens <= 12, plain.usage

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage

    completion = client.completions.create(
        model=MODEL, prompt="The fox", max_tokens=6, temperature=0, n=2, logprobs=2, stop=["\n\n\n"]
    )
    assert len(completion.choices) == 2, completion
    assert completion.choices[0].text == completion.choices[1].text, completion
    assert completion.choices[0].logprobs is not None, completion

    streamed = client.completions.create(model=MODEL, prompt="The fox", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text

    try:
        client.chat.completions.create(model=MODEL, messages=messages, temperature=-1)
        raise AssertionError("temperature -1 was accepted")
    except openai.UnprocessableEntityError as err:
        assert err.status_code == 422 and "temperature" in str(err), err
    try:
        client.chat.completions.create(model="not-" + MODEL, messages=messages, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as err:
        assert err.status_code == 404, err
    try:
        OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as err:
        assert err.status_code == 401, err
    print("openai client: OK")


def check_runpod():
    try:
        import runpod
    except ImportError:
        print("runpod client: SKIPPED (package not installed)")
        return
    runpod.api_key = KEY
    endpoint = runpod.Endpoint("local-endpoint")

    health = endpoint.health()
    assert set(health) >= {"jobs", "workers"}, health

    output = endpoint.run_sync({"prompt": "hello", "sampling_params": {"max_tokens": 4}}, timeout=120)
    assert output[0]["choices"][0]["tokens"], output

    job = endpoint.run(
        {"prompt": "hello", "stream": True, "sampling_params": {"max_tokens": 16, "ignore_eos": True}}
    )
    items = list(job.stream())
    assert len(items) >= 2, items
    assert sum(len(item["choices"][0]["tokens"]) for item in items) >= 2, items
    assert job.status() == "COMPLETED"
    assert job.output(timeout=60) == items, (job.output(), items)

    long_job = endpoint.run({"prompt": "hello", "sampling_params": {"max_tokens": 1500, "ignore_eos": True}})
    cancelled = long_job.cancel()
    assert cancelled["id"] == long_job.job_id and cancelled["status"] in ("CANCELLED", "COMPLETED"), cancelled
    assert long_job.status() in ("CANCELLED", "COMPLETED")

    purged = endpoint.purge_queue()
    assert purged["status"] == "completed" and isinstance(purged["removed"], int), purged
    print("runpod client: OK")


if __name__ == "__main__":
    check_openai()
    check_runpod()
    sys.exit(0)
