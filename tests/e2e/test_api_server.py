"""`lathe api` as a real process on a free port, driven by the official `openai` client (and by
raw HTTP where the client would hide what is checked: the SSE lines, malformed JSON)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import IDENTITY, one_error, run_main
from tests.servers import free_port, start_server, stop_server

openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package brings (httpx2 in openai 3, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

KEY = "test-key"
TOOL = {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": TOOL}]
WHO = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> str:
    """A full fine-tune that learned four identity answers and one tool-calling conversation
    (call -> result -> answer) in Lathe's sharegpt format."""
    import lathe

    root = tmp_path_factory.mktemp("api")
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))[:4]
    convs = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
             for r in rows]
    convs.append({"conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temperature": 21})},
        {"from": "gpt", "value": "It is 21 degrees in Paris."}], "tools": json.dumps([TOOL])})
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in convs), encoding="utf-8")
    columns = {"messages": "conversations", "tools": "tools"}
    (root / "dataset_info.json").write_text(json.dumps({"chat": {
        "file_name": "chat.jsonl", "formatting": "sharegpt", "columns": columns}}))
    return lathe.train({"model_name_or_path": str(tiny_model), "dataset": "chat", "dataset_dir": str(root),
                        "template": "chatml", "cutoff_len": 256, "finetuning_type": "full", "max_steps": 60,
                        "per_device_train_batch_size": 5, "learning_rate": 2e-2, "lr_scheduler_type": "constant",
                        "logging_steps": 100, "save_steps": 1000, "output_dir": str(root / "run"), "seed": 0,
                        "report_to": "none"}).output_dir


def start(run: str, log: Path, *keys: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    return start_server("api", [run, *keys], "/health", log, env=env)


stop = stop_server


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("api-log") / "server.log"
    proc, url = start(run_dir, log, f"api_key={KEY}", "max_n=100", "max_queue=64", "max_tokens_limit=100",
                      "max_request_bytes=20000", "cors_origins=http://app.example")
    yield url, log
    stop(proc)
    assert "Traceback" not in log.read_text()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def test_models_health_and_the_api_key(server, client):
    url, log = server
    assert [m.id for m in client.models.list()] == ["lathe"]
    assert health(url)["status"] == "ok"  # no key needed
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key=key or "x", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lathe", "messages": WHO})  # no header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json")  # the key is checked before the body
    assert r.status_code == 401
    assert "API key required" in log.read_text()
    # CORS: the configured origin may call from a browser; another may not
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_chat_answers_what_it_learned_and_the_stream_joins_to_the_same_text(server, client):
    learned = json.loads(IDENTITY.read_text(encoding="utf-8"))[0]
    assert learned["instruction"] == "Who are you?"
    plain = client.chat.completions.create(model="lathe", messages=WHO)
    assert plain.choices[0].message.content == learned["output"]
    assert plain.choices[0].finish_reason == "stop"
    usage = plain.usage
    assert usage.completion_tokens > 5 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    pieces, reasons, usages = [], [], []
    for chunk in client.chat.completions.create(model="lathe", messages=WHO, stream=True,
                                                stream_options={"include_usage": True}):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons += [c.finish_reason] if c.finish_reason else []
        usages += [chunk.usage] if chunk.usage else []
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) > 3  # really streamed, in pieces
    assert reasons == ["stop"] and len(usages) == 1 and usages[0].completion_tokens == usage.completion_tokens

    # the raw lines: one role chunk first, finish_reason once, the usage chunk without choices, [DONE] last
    body = {"model": "lathe", "messages": WHO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == usage.completion_tokens
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_a_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="lathe", messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model="lathe", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == "It is 21 degrees in Paris."
    assert answer.choices[0].finish_reason == "stop"

    # streamed: the call arrives whole as a tool_calls delta, never as text
    calls, text = [], ""
    for chunk in client.chat.completions.create(model="lathe", messages=messages[:1], tools=TOOLS, stream=True):
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            text += c.delta.content or ""
            if c.finish_reason:
                assert c.finish_reason == "tool_calls"
    assert text == "" and [c.function.name for c in calls] == ["weather"]
    # tool_choice none: the schemas are not sent, so the model answers in text
    plain = client.chat.completions.create(model="lathe", messages=messages[:1], tools=TOOLS, tool_choice="none",
                                           max_tokens=10)
    assert plain.choices[0].message.tool_calls is None


def test_completions_logprobs_n_seed_stop_and_max_tokens(client):
    r = client.completions.create(model="lathe", prompt="I am", max_tokens=8, logprobs=2)
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 8
    assert len(c.logprobs.tokens) == 8 and "".join(c.logprobs.tokens) == c.text
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-5
               for top, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))

    def sampled(seed: int) -> list[str]:
        out = client.chat.completions.create(model="lathe", messages=WHO, n=3, temperature=2.0, top_p=1.0,
                                             seed=seed, max_tokens=12, presence_penalty=1.5)
        return [x.message.content for x in out.choices]

    assert sampled(1) == sampled(1) and len(sampled(1)) == 3  # a seed repeats
    full = client.chat.completions.create(model="lathe", messages=WHO).choices[0].message.content
    cut = client.chat.completions.create(model="lathe", messages=WHO, stop=["helpful"])
    assert cut.choices[0].message.content == full.split("helpful")[0].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="lathe", messages=WHO, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    lp = client.chat.completions.create(model="lathe", messages=WHO, logprobs=True, top_logprobs=3, max_tokens=4)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content).strip() == lp.choices[0].message.content


def test_json_object_replies_are_json(client):
    r = client.chat.completions.create(model="lathe", messages=WHO, response_format={"type": "json_object"},
                                       max_tokens=40)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def status(exc_type, **kwargs):
        with pytest.raises(exc_type) as e:
            client.chat.completions.create(**{"model": "lathe", "messages": WHO, **kwargs})
        err = e.value.body
        assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in err["message"]
        return e.value.status_code, err

    assert status(openai.NotFoundError, model="gpt-4")[1]["code"] == "model_not_found"
    code, err = status(openai.BadRequestError, messages=[{"role": "wizard", "content": "hi"}])
    assert code == 400 and err["param"] == "messages[0].role"
    assert status(openai.BadRequestError, messages=[{"role": "user", "content": "  "}])[1]["param"] == \
        "messages[0].content"
    code, err = status(openai.BadRequestError, messages=[{"role": "user", "content": "word " * 400}])
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    assert status(openai.BadRequestError, n=101)[1]["param"] == "n"
    assert status(openai.BadRequestError, max_tokens=101)[1]["code"] == "max_tokens_too_large"
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "thing"}}}]
    assert "not a JSON schema" in status(openai.BadRequestError, tools=bad_schema)[1]["message"]
    assert status(openai.UnprocessableEntityError, temperature="hot")[0] == 422
    code, err = status(openai.RateLimitError, n=65)  # 65 replies > max_queue=64
    assert code == 429 and err["code"] == "queue_full"

    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * 30000, headers=auth)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nowhere", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lathe", "messages": WHO, "n": 65}, headers=auth)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert client.chat.completions.create(model="lathe", messages=WHO).choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server):
    url = server[0]
    before = health(url)["finished"].get("cancelled", 0)
    body = {"model": "lathe", "prompt": "I am", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    deadline = time.time() + 30
    while health(url)["finished"].get("cancelled", 0) == before and time.time() < deadline:
        time.sleep(0.1)
    assert health(url)["finished"].get("cancelled", 0) == before + 1 and health(url)["in_flight"] == 0


def test_fifty_concurrent_streaming_clients_all_get_their_whole_answer(server, client):
    url = server[0]
    expected = client.chat.completions.create(model="lathe", messages=WHO).choices[0].message.content
    before = health(url)
    results, errors = [], []
    gate = threading.Barrier(50)

    def one() -> None:
        try:
            gate.wait()
            text = "".join(ch.choices[0].delta.content or "" for ch in
                           client.chat.completions.create(model="lathe", messages=WHO, stream=True) if ch.choices)
            results.append(text)
        except Exception as e:  # noqa: BLE001 - counted: the test fails on any
            errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and results == [expected] * 50
    after = health(url)
    assert after["in_flight"] == 0 and after["rows"] - before["rows"] == 50
    assert after["batching"] == "continuous"
    steps = after["steps"] - before["steps"]
    assert (after["step_rows"] - before["step_rows"]) / steps > 4  # the replies shared decoding steps


def test_cors_is_off_unless_configured(run_dir, tmp_path):
    proc, url = start(run_dir, tmp_path / "server.log", "request_timeout=0.001")
    try:
        plain = httpx.options(url + "/v1/models", headers={"Origin": "http://app.example",
                                                           "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in plain.headers
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # and request_timeout, on the same server
            c.chat.completions.create(model="lathe", messages=WHO)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"model": "lathe", "messages": WHO, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[-1][6:])["error"]["code"] == "timeout"  # the stream says why it ended
        assert health(url)["finished"]["timeout"] == 2
    finally:
        stop(proc)


def test_a_decoding_failure_is_a_500_without_a_stack_trace(run_dir, tmp_path):
    proc, url = start(run_dir, tmp_path / "server.log", env={"LATHE_API_FAULT": "generate"})
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="lathe", messages=WHO)
        assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
        assert "Traceback" not in json.dumps(e.value.body)
        assert health(url)["status"] == "ok"  # still serving
    finally:
        stop(proc)
    assert "decoding failed" in (tmp_path / "server.log").read_text()  # the details stay in the server's log


def test_startup_problems_are_one_line(run_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is in use" in one_error(run_main("api", run_dir, f"port={port}"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "broken" in one_error(run_main("api", str(broken), f"port={free_port()}"))
    assert "vllm" in one_error(run_main("api", run_dir, "infer_backend=vllm", f"port={free_port()}"))
    assert "max_batch_size=0 must be at least 1" in one_error(run_main("api", run_dir, "max_batch_size=0"))
