"""The OpenAI-compatible routes (FastAPI), over the inference engine and the scheduler.

GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Streams are
server-sent events in the chunk format of the OpenAI API: the first chunk of each choice
carries the role, later ones the text, one chunk the finish_reason, then (when asked with
stream_options.include_usage) a chunk with no choices and the usage, then `data: [DONE]`.
Every error is OpenAI's error object ({"error": {"message", "type", "param", "code"}})
with its HTTP status; a stack trace never leaves the server (it goes to its log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lathe.config.schema import LatheConfig, ServeConfig
from lathe.infer.engine import Sampling, Sequence, TokenLogprob
from lathe.infer.load import Generator
from lathe.infer.messages import (
    MessageError,
    check_tools,
    may_be_tool_call,
    parse_tool_calls,
    prompt_ids,
    scored_conversation,
    to_conversation,
)
from lathe.serve.scheduler import QueueFull, Scheduler

log = logging.getLogger("lathe.serve")
GENERATIVE = ("causal_lm", "seq2seq")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests (unknown fields are ignored, as the OpenAI API does) --------------------------

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] | None = None
    conversations: list[list[dict[str, Any]]] | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str]


@dataclass
class Choice:
    seq: Sequence
    index: int
    prefix: str = ""  # a reply begun by the server (a forced tool call)


# --- the app ----------------------------------------------------------------------------------

def create_app(gen: Generator, full: LatheConfig, scheduler: Scheduler) -> Any:
    cfg = full.serve
    tasks = TaskRoutes(gen, full)
    app = FastAPI(title="Lathe API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.started = int(time.time())
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:  # noqa: ARG001
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, f"the body is not valid JSON ({first.get('msg', '')})",
                                           code="invalid_json"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(ApiError(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                                       param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))
        if e.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # noqa: ARG001
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error ({type(e).__name__}); the server log has the details",
                                       type="server_error", code="internal_error"))

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != cfg.served_model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {cfg.served_model_name!r}",
                           param="model", code="model_not_found")

    def check_generative() -> None:
        if gen.task not in GENERATIVE:
            raise ApiError(400, f"this model is a {gen.task} model; it does not generate text",
                           code="unsupported_model")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.served_model_name, "in_flight": scheduler.in_flight,
                "batching": scheduler.mode, "batches": scheduler.batches, "steps": scheduler.steps,
                "step_rows": scheduler.step_rows, "rows": scheduler.rows, "finished": dict(scheduler.finished)}

    key = [Depends(authorize)]  # before the body is read: a caller without the key learns nothing

    @app.get("/v1/models", dependencies=key)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model",
                                            "created": app.state.started, "owned_by": "lathe"}]}

    @app.post("/v1/chat/completions", dependencies=key)
    async def chat(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        check_generative()
        plan = _chat_plan(body, gen, cfg)
        if body.stream:
            return StreamingResponse(_chat_stream(body, plan, scheduler), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _run(plan.choices, scheduler, request)
        return _chat_response(body, plan, choices)

    @app.post("/v1/completions", dependencies=key)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        check_generative()
        plan = _completion_plan(body, gen, cfg)
        if body.stream:
            return StreamingResponse(_completion_stream(body, plan, gen, scheduler),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _run(plan.choices, scheduler, request)
        return _completion_response(body, plan, choices, gen)

    @app.post("/v1/embeddings", dependencies=key)
    async def embeddings(body: EmbeddingRequest) -> Any:
        check_model(body.model)
        return await tasks.embed(body)

    @app.post("/v1/classify", dependencies=key)
    async def classify(body: ClassifyRequest) -> Any:
        check_model(body.model)
        return await tasks.classify(body)

    @app.post("/v1/score", dependencies=key)
    async def score(body: ScoreRequest) -> Any:
        check_model(body.model)
        return await tasks.score(body)

    return app


class _BodyLimit:
    """413 for a body over the limit (by Content-Length, or counted while it streams in)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(ApiError(413, f"the request body is larger than max_request_bytes={self.limit}",
                                   code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# --- planning: a request -> sequences --------------------------------------------------------

@dataclass
class Plan:
    choices: list[Choice]
    prompt_tokens: int
    tool_names: set[str]
    id: str
    created: int


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop has {len(stops)} strings; at most 4", param="stop")
    return tuple(s for s in stops if s)


def _budget(asked: int | None, prompt_len: int, gen: Generator, cfg: ServeConfig, param: str,
            prompt_param: str) -> int:
    context = gen.context_len
    if context is not None and prompt_len >= context:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {context} tokens",
                       param=prompt_param, code="context_length_exceeded")
    room = (context - prompt_len) if context is not None else cfg.max_tokens_limit
    if asked is not None:
        if asked > cfg.max_tokens_limit:
            raise ApiError(400, f"{param}={asked} is over this server's limit of {cfg.max_tokens_limit}",
                           param=param, code="max_tokens_too_large")
        if asked > room:
            raise ApiError(400, f"{param}={asked} does not fit: the prompt is {prompt_len} tokens and the model's "
                           f"context is {context} tokens (at most {room} for the reply)", param=param,
                           code="context_length_exceeded")
        return asked
    return max(1, min(gen.generate.max_new_tokens, room, cfg.max_tokens_limit))


def _sampling(body: _Request, gen: Generator, max_tokens: int, index: int, **extra: Any) -> Sampling:
    """The request's settings; what it leaves out comes from the served model's generation settings."""
    g = gen.generate
    temperature = body.temperature if body.temperature is not None else (g.temperature if g.do_sample else 0.0)
    top_p = body.top_p if body.top_p is not None else (g.top_p if g.do_sample else 1.0)
    seed = body.seed + index if body.seed is not None else None
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=g.top_k if body.temperature is None and g.do_sample else 0, seed=seed,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    repetition_penalty=g.repetition_penalty, stop=_stops(body.stop), **extra)


def _check_n(body: _Request, cfg: ServeConfig) -> None:
    if body.n > cfg.max_n:
        raise ApiError(400, f"n={body.n} is over this server's limit of {cfg.max_n} choices", param="n")


def _deadline(cfg: ServeConfig) -> float:
    return time.monotonic() + cfg.request_timeout


def _chat_plan(body: ChatRequest, gen: Generator, cfg: ServeConfig) -> Plan:
    _check_n(body, cfg)
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    try:
        if body.tools:
            check_tools(body.tools)
        conv = to_conversation(body.messages, tools)
        prompt = prompt_ids(gen.template, conv, gen.tokenizer)
    except MessageError as e:
        raise ApiError(400, str(e), param=e.param) from None
    names = {t["function"]["name"] for t in tools or []}
    prefix = _forced_call(body.tool_choice, names) if tools else ""
    if prefix:
        prompt = prompt + gen.tokenizer.encode(prefix, add_special_tokens=False)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    budget = _budget(asked, len(prompt), gen, cfg, param, "messages")
    json_object = _json_mode(body.response_format)
    lp = (body.top_logprobs or 0) if body.logprobs else None
    choices = [Choice(Sequence(prompt, _sampling(body, gen, budget, i, logprobs=lp, json_object=json_object,
                                                 strip=not prefix),
                               deadline=_deadline(cfg)), i, prefix) for i in range(body.n)]
    return Plan(choices, len(prompt), names, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))


def _forced_call(choice: str | dict | None, names: set[str]) -> str:
    """The beginning of the reply when tool_choice asks for a call (named: that tool)."""
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return '{"name": "' + name + '", "arguments": '
    if choice == "required":
        return '{"name": "'
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {choice!r} must be none, auto, required or a named function",
                       param="tool_choice")
    return ""


def _json_mode(fmt: dict | None) -> bool:
    kind = (fmt or {}).get("type", "text")
    if kind == "json_object":
        return True
    if kind != "text":
        raise ApiError(400, f"response_format {kind!r} is not supported; use json_object (a JSON object is "
                       "guaranteed) or text", param="response_format")
    return False


def _completion_plan(body: CompletionRequest, gen: Generator, cfg: ServeConfig) -> Plan:
    _check_n(body, cfg)
    prompts = body.prompt
    if isinstance(prompts, str) or prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts:
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(prompts) * body.n > cfg.max_n * 4:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is over this server's limit", param="prompt")
    encoded = [gen.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    vocab = len(gen.tokenizer)
    if any(not ids or any(not 0 <= t < vocab for t in ids) for ids in encoded):
        raise ApiError(400, "a prompt is empty or holds a token id outside the vocabulary", param="prompt")
    choices = []
    total = 0
    for k, ids in enumerate(encoded):
        budget = _budget(body.max_tokens if body.max_tokens is not None else 16, len(ids), gen, cfg, "max_tokens",
                         "prompt")
        total += len(ids)
        for i in range(body.n):
            sampling = _sampling(body, gen, budget, i, logprobs=body.logprobs, strip=False)
            choices.append(Choice(Sequence(ids, sampling, deadline=_deadline(cfg)), k * body.n + i))
    return Plan(choices, total, set(), f"cmpl-{uuid.uuid4().hex}", int(time.time()))


# --- running ---------------------------------------------------------------------------------

def _submit(choices: list[Choice], scheduler: Scheduler, on_text: Any, on_done: Any) -> None:
    for c in choices:
        c.seq.on_text = (lambda text, lps, c=c: on_text(c, text, lps)) if on_text else None
    try:
        scheduler.submit([c.seq for c in choices], on_done)
    except QueueFull:
        raise ApiError(429, f"the server is busy ({scheduler.max_queue} replies waiting or in progress); retry "
                       "shortly", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None


async def _run(choices: list[Choice], scheduler: Scheduler, request: Any) -> list[Choice]:
    """Decode the choices; cancel them when the client goes away."""
    loop = asyncio.get_running_loop()
    left = len(choices)
    finished = asyncio.Event()
    errors: list[BaseException] = []

    def done(seq: Sequence, error: BaseException | None) -> None:
        def mark() -> None:
            nonlocal left
            left -= 1
            if error is not None:
                errors.append(error)
            if left == 0:
                finished.set()
        loop.call_soon_threadsafe(mark)

    _submit(choices, scheduler, None, done)
    try:
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for c in choices:
                        c.seq.cancelled.set()
    except asyncio.CancelledError:
        for c in choices:
            c.seq.cancelled.set()
        raise
    if errors:
        raise errors[0]
    if any(c.seq.finish_reason == "timeout" for c in choices):
        raise ApiError(504, "the request took longer than request_timeout; ask for fewer tokens or raise it",
                       type="timeout_error", code="timeout")
    return choices


def _finish_reason(c: Choice, tool_names: set[str]) -> tuple[str, list | None]:
    reason = {"stop": "stop", "length": "length"}.get(c.seq.finish_reason or "", "stop")
    if tool_names:
        calls = parse_tool_calls(c.prefix + c.seq.text, tool_names)
        if calls:
            return "tool_calls", [{"id": t.id, "type": "function", "function": {"name": t.name,
                                                                               "arguments": t.arguments}}
                                  for t in calls]
    return reason, None


def _chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for _, s, v in t.top]}
                        for t in lps], "refusal": None}


def _usage(plan: Plan, choices: list[Choice]) -> dict[str, int]:
    done = sum(len(c.seq.tokens) for c in choices)
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": done, "total_tokens": plan.prompt_tokens + done}


def _chat_response(body: ChatRequest, plan: Plan, choices: list[Choice]) -> dict[str, Any]:
    out = []
    for c in choices:
        reason, calls = _finish_reason(c, plan.tool_names)
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else c.prefix + c.seq.text,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        out.append({"index": c.index, "message": message, "finish_reason": reason,
                    "logprobs": _chat_logprobs(c.seq.logprobs) if body.logprobs else None})
    return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": body.model,
            "choices": out, "usage": _usage(plan, choices), "system_fingerprint": None}


def _completion_logprobs(lps: list[TokenLogprob], start: int) -> dict[str, Any]:
    offsets, at = [], start
    for t in lps:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: v for _, s, v in t.top} for t in lps], "text_offset": offsets}


def _completion_response(body: CompletionRequest, plan: Plan, choices: list[Choice], gen: Generator) -> dict:
    out = []
    for c in choices:
        echo = gen.tokenizer.decode(c.seq.prompt, skip_special_tokens=True) if body.echo else ""
        reason, _ = _finish_reason(c, set())
        out.append({"index": c.index, "text": echo + c.seq.text, "finish_reason": reason,
                    "logprobs": _completion_logprobs(c.seq.logprobs, len(echo)) if body.logprobs is not None
                    else None})
    return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": body.model,
            "choices": out, "usage": _usage(plan, choices)}


# --- streaming -------------------------------------------------------------------------------

def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(choices: list[Choice], scheduler: Scheduler) -> AsyncIterator[tuple]:
    """(kind, choice, text, logprobs, error) as the engine produces them; cancels on exit."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_text(c: Choice, text: str, lps: list) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("text", c, text, lps, None))

    by_seq = {id(c.seq): c for c in choices}

    def on_done(seq: Sequence, error: BaseException | None) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("done", by_seq[id(seq)], "", [], error))

    _submit(choices, scheduler, on_text, on_done)
    left = len(choices)
    try:
        while left:
            event = await events.get()
            if event[0] == "done":
                left -= 1
            yield event
    finally:  # the client went away (or the stream ended): stop what is still generating
        for c in choices:
            c.seq.cancelled.set()


def _stream_error(error: BaseException | None, choices: list[Choice]) -> dict | None:
    if error is not None:
        log.error("decoding failed: %s", error)
        return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details",
                        type="server_error", code="internal_error").body()
    if any(c.seq.finish_reason == "timeout" for c in choices):
        return ApiError(504, "the request took longer than request_timeout", type="timeout_error",
                        code="timeout").body()
    return None


async def _chat_stream(body: ChatRequest, plan: Plan, scheduler: Scheduler) -> AsyncIterator[str]:
    usage = bool((body.stream_options or {}).get("include_usage"))
    base = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": body.model,
            "system_fingerprint": None}

    def chunk(index: int, delta: dict, reason: str | None = None, lps: list | None = None) -> str:
        data = {**base, "choices": [{"index": index, "delta": delta, "logprobs": _chat_logprobs(lps)
                                     if lps and body.logprobs else None, "finish_reason": reason}]}
        if usage:
            data["usage"] = None
        return _sse(data)

    held: dict[int, str] = {c.index: c.prefix for c in plan.choices}  # text held back: may be a tool call
    holding = {c.index: bool(plan.tool_names) for c in plan.choices}
    for c in plan.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for kind, c, text, lps, error in _events(plan.choices, scheduler):
        if kind == "text":
            if holding[c.index]:
                held[c.index] += text
                if may_be_tool_call(held[c.index]):
                    continue
                holding[c.index] = False
                text, held[c.index] = held[c.index], ""
            if text or lps:
                yield chunk(c.index, {"content": text}, lps=lps)
            continue
        problem = _stream_error(error, [c])
        if problem:
            yield _sse(problem)
            return
        reason, calls = _finish_reason(c, plan.tool_names)
        if calls:
            deltas = [{"index": k, "id": t["id"], "type": "function", "function": t["function"]}
                      for k, t in enumerate(calls)]
            yield chunk(c.index, {"tool_calls": deltas})
        elif held[c.index]:
            yield chunk(c.index, {"content": held[c.index]})
        yield chunk(c.index, {}, reason)
    if usage:
        yield _sse({**base, "choices": [], "usage": _usage(plan, plan.choices)})
    yield _sse("[DONE]")


async def _completion_stream(body: CompletionRequest, plan: Plan, gen: Generator,
                             scheduler: Scheduler) -> AsyncIterator[str]:
    usage = bool((body.stream_options or {}).get("include_usage"))
    base = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": body.model}

    def chunk(index: int, text: str, reason: str | None = None, lps: list | None = None) -> str:
        data = {**base, "choices": [{"index": index, "text": text, "finish_reason": reason,
                                     "logprobs": _completion_logprobs(lps, 0) if lps and body.logprobs is not None
                                     else None}]}
        if usage:
            data["usage"] = None
        return _sse(data)

    if body.echo:
        for c in plan.choices:
            yield chunk(c.index, gen.tokenizer.decode(c.seq.prompt, skip_special_tokens=True))
    async for kind, c, text, lps, error in _events(plan.choices, scheduler):
        if kind == "text":
            yield chunk(c.index, text, lps=lps)
            continue
        problem = _stream_error(error, [c])
        if problem:
            yield _sse(problem)
            return
        yield chunk(c.index, "", _finish_reason(c, set())[0])
    if usage:
        yield _sse({**base, "choices": [], "usage": _usage(plan, plan.choices)})
    yield _sse("[DONE]")


# --- task models: embeddings and classes -----------------------------------------------------

class TaskRoutes:
    """/v1/embeddings for embedding models (stage embed) and /v1/classify for classifiers
    (stage cls), one forward pass per request, run off the event loop one at a time."""

    def __init__(self, gen: Generator, cfg: LatheConfig) -> None:
        import threading

        self.gen, self.cfg = gen, cfg
        self.lock = threading.Lock()

    def _texts(self, value: Any, max_items: int = 256) -> list[list[int]]:
        items = [value] if isinstance(value, str) or value and isinstance(value[0], int) else list(value)
        if not items or len(items) > max_items:
            raise ApiError(400, f"input must hold 1 to {max_items} texts", param="input")
        tok, cutoff = self.gen.tokenizer, self.cfg.data.cutoff_len
        out = []
        for k, item in enumerate(items):
            if isinstance(item, str):
                if not item.strip():
                    raise ApiError(400, f"input[{k}] is empty", param="input")
                out.append(tok(item, truncation=True, max_length=cutoff)["input_ids"])
            else:
                if not item or any(not 0 <= t < len(tok) for t in item):
                    raise ApiError(400, f"input[{k}] holds a token id outside the vocabulary", param="input")
                out.append(list(item)[:cutoff])
        return out

    def _forward(self, ids: list[list[int]], fn: Any) -> Any:
        """`fn(input_ids, attention_mask)` over the rows padded on the RIGHT (mean and last-token
        pooling and the reward read each row's real tokens by the mask), one call at a time."""
        import torch

        pad = self.gen.tokenizer.pad_token_id or 0
        width = max(len(r) for r in ids)
        rows = [r + [pad] * (width - len(r)) for r in ids]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in ids]
        device = self.gen.model.device
        with self.lock, torch.no_grad():
            return fn(torch.tensor(rows, device=device), torch.tensor(mask, device=device))

    @staticmethod
    def _listed(data: list[dict], model: str, ids: list[list[int]]) -> dict[str, Any]:
        n = sum(len(r) for r in ids)
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    async def embed(self, body: EmbeddingRequest) -> dict[str, Any]:
        if self.gen.task != "embed":
            raise ApiError(400, f"this model is a {self.gen.task} model; /v1/embeddings serves embedding models "
                           "(stage embed)", code="unsupported_model")
        if body.encoding_format not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be float or base64", param="encoding_format")
        ids = self._texts(body.input)

        def run(input_ids: Any, mask: Any) -> Any:
            import torch

            from lathe.recipes.embed import pool

            hidden = self.gen.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            vectors = pool(hidden, mask, self.cfg.task.pooling if self.cfg.task.pooling != "auto" else "mean")
            if body.dimensions:
                vectors = vectors[:, :body.dimensions]
            return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu()

        vectors = await asyncio.to_thread(self._forward, ids, run)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                import base64

                import numpy as np

                value: Any = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            else:
                value = [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": value})
        return self._listed(data, body.model, ids)

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        if self.gen.task != "seq_cls":
            raise ApiError(400, f"this model is a {self.gen.task} model; /v1/classify serves classifiers (stage cls)",
                           code="unsupported_model")
        from lathe.data.tasks import LabelSet
        from lathe.recipes.cls import _decide, _prediction

        config = self.gen.model.config
        names = tuple(self.cfg.task.label_names or [config.id2label[k] for k in sorted(config.id2label)])
        problem = self.cfg.task.problem_type if self.cfg.task.problem_type != "auto" else \
            (config.problem_type or "single_label_classification")
        labels = LabelSet(problem, names)
        ids = self._texts(body.input)
        logits = await asyncio.to_thread(
            self._forward, ids, lambda i, m: self.gen.model(input_ids=i, attention_mask=m).logits.float().cpu().numpy())
        decided = _decide(logits, labels)
        data = []
        for k in range(len(ids)):
            found = _prediction(logits[k], decided[k], labels)
            data.append({"index": k, "label": found.pop("predict"), **found})
        return self._listed(data, body.model, ids)

    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        if self.gen.task != "reward":
            raise ApiError(400, f"this model is a {self.gen.task} model; /v1/score serves reward models (stage rm)",
                           code="unsupported_model")
        if (body.messages is None) == (body.conversations is None):
            raise ApiError(400, "give messages (one conversation) or conversations (a list of them)",
                           param="messages")
        convs = [body.messages] if body.messages is not None else body.conversations
        if not convs or len(convs) > 256:
            raise ApiError(400, "conversations must hold 1 to 256 conversations", param="conversations")
        ids = []
        for k, messages in enumerate(convs):
            try:
                conv = scored_conversation(messages)
            except MessageError as e:
                where = "messages" if body.messages is not None else f"conversations[{k}]"
                raise ApiError(400, f"{where}: {e}", param=where) from None
            turns = self.gen.template.encode_turns(conv, self.gen.tokenizer)
            row = [t for prompt, reply in turns for t in prompt + reply]
            ids.append(row[-self.cfg.data.cutoff_len:])

        def run(input_ids: Any, mask: Any) -> Any:
            from lathe.model.reward import reward_scores

            return reward_scores(self.gen.model, input_ids, mask).cpu().tolist()

        scores = await asyncio.to_thread(self._forward, ids, run)
        return self._listed([{"index": k, "score": v} for k, v in enumerate(scores)], body.model, ids)
