"""OpenAI-style messages -> the prompt the model was trained on; tool calls parsed back.

The mapping is Lathe's data format (LLaMA-Factory's): `system` (or `developer`) is the
system prompt; `user` a user turn; `assistant` a reply; an assistant message with
`tool_calls` is a `function` turn whose content is the call as JSON
(`{"name": ..., "arguments": {...}}`, a list for several calls); `tool` is an
`observation` turn (several results in a row become one, a JSON list). Tool schemas go
to the template's tools slot as the list of their `function` objects, which is what a
`tools` column in the training data holds. So a model fine-tuned on tool-calling data is
prompted exactly as it was trained, and its reply is parsed with the same convention.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lathe.data.conversation import Conversation, Message

PROMPT_SIDE = ("user", "observation")


class MessageError(ValueError):
    """A request's messages or tools that cannot be rendered; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MessageError(f"{where}.content[{k}] is of type {kind!r}; this model reads text only",
                                   f"{where}.content")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise MessageError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _call_json(calls: list[dict], where: str) -> str:
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MessageError(f"{where}.tool_calls[{k}] needs function.name", f"{where}.tool_calls")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise MessageError(f"{where}.tool_calls[{k}].function.arguments is not JSON",
                               f"{where}.tool_calls") from None
        out.append({"name": fn["name"], "arguments": args})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def to_conversation(messages: list[dict], tools: list[dict] | None = None) -> Conversation:
    """The conversation to prompt with: it ends with a user or tool message."""
    if not messages:
        raise MessageError("messages is empty; send at least one user message", "messages")
    system: list[str] = []
    turns: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if turns:
                raise MessageError(f"{where}: a {role} message must come before the conversation", f"{where}.role")
            system.append(_text(m.get("content"), where))
            continue
        if role == "user":
            msg = Message("user", _text(m.get("content"), where))
        elif role == "tool":
            msg = Message("observation", _text(m.get("content"), where))
        elif role == "assistant":
            calls = m.get("tool_calls")
            msg = (Message("function", _call_json(calls, where)) if calls
                   else Message("assistant", _text(m.get("content"), where)))
        else:
            raise MessageError(f"{where}.role is {role!r}; expected system, developer, user, assistant or tool",
                               f"{where}.role")
        if msg.role in ("user", "assistant") and not msg.content.strip():
            raise MessageError(f"{where}.content is empty", f"{where}.content")
        if turns and (turns[-1].role in PROMPT_SIDE) == (msg.role in PROMPT_SIDE):
            if msg.role == "observation" and turns[-1].role == "observation":  # parallel calls' results
                turns[-1] = Message("observation", _join_results(turns[-1].content, msg.content))
                continue
            if msg.role == "user" and turns[-1].role == "user":
                turns[-1] = Message("user", turns[-1].content + "\n\n" + msg.content)
                continue
            raise MessageError(f"{where}: two {msg.role} messages in a row; replies and questions must alternate",
                               f"{where}.role")
        if not turns and msg.role not in PROMPT_SIDE:
            raise MessageError(f"{where}: the conversation must start with a user message", f"{where}.role")
        turns.append(msg)
    if not turns or turns[-1].role not in PROMPT_SIDE:
        raise MessageError("the last message must be from the user or a tool (the model answers it)", "messages")
    schemas = json.dumps([t["function"] for t in tools], ensure_ascii=False) if tools else None
    return Conversation(tuple(turns) + (Message("assistant", ""),),
                        system="\n\n".join(system) if system else None, tools=schemas)


def scored_conversation(messages: list[dict]) -> Conversation:
    """A conversation that ends with the assistant's reply (what a reward model scores)."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise MessageError("the last message must be the assistant's reply to score", "messages")
    conv = to_conversation(messages[:-1])
    last = messages[-1]
    reply = (Message("function", _call_json(last["tool_calls"], f"messages[{len(messages) - 1}]"))
             if last.get("tool_calls") else Message("assistant", _text(last.get("content"),
                                                                        f"messages[{len(messages) - 1}]")))
    return Conversation(conv.messages[:-1] + (reply,), system=conv.system, tools=conv.tools)


def _join_results(first: str, second: str) -> str:
    try:
        earlier = json.loads(first)
        items = earlier if isinstance(earlier, list) and first.startswith("[") else [first]
    except ValueError:
        items = [first]
    return json.dumps([*items, second], ensure_ascii=False)


def prompt_ids(template: Any, conv: Conversation, tokenizer: Any) -> list[int]:
    """Token ids that ask for the reply to the conversation's last message."""
    turns = template.encode_turns(conv, tokenizer)
    ids: list[int] = []
    for prompt, response in turns[:-1]:
        ids += prompt + response
    return ids + turns[-1][0]


# --- tools -------------------------------------------------------------------------------

_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def check_tools(tools: list[dict]) -> None:
    """Each tool is {type: function, function: {name, description?, parameters?}} with a JSON
    schema as parameters."""
    names = set()
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise MessageError(f"{where}.type must be 'function'", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
            raise MessageError(f"{where}.function.name must be 1-64 letters, digits, _ . or -",
                               f"{where}.function.name")
        if fn["name"] in names:
            raise MessageError(f"{where}.function.name {fn['name']!r} is given twice", f"{where}.function.name")
        names.add(fn["name"])
        params = fn.get("parameters")
        if params is not None:
            problem = schema_problem(params)
            if problem:
                raise MessageError(f"{where}.function.parameters is not a JSON schema: {problem}",
                                   f"{where}.function.parameters")


def schema_problem(schema: Any, where: str = "") -> str | None:
    """Why `schema` is not a JSON schema (types, properties, items, required), or None."""
    at = f" at {where}" if where else ""
    if not isinstance(schema, dict):
        return f"expected an object{at}, got {type(schema).__name__}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    bad = [t for t in kinds if t not in _JSON_TYPES]
    if bad:
        return f"type {bad[0]!r}{at} is not one of {', '.join(sorted(_JSON_TYPES))}"
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            return f"properties{at} must be an object"
        for name, sub in props.items():
            problem = schema_problem(sub, f"{where}.{name}" if where else name)
            if problem:
                return problem
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        return f"required{at} must be a list of property names"
    if "items" in schema and schema["items"] is not True:
        return schema_problem(schema["items"], f"{where}[]")
    return None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the API returns it


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls in a reply written as Lathe's data writes them (a JSON object with name and
    arguments, a list of them, or those inside <tool_call> tags), to known tools only; None
    when the reply is not a call."""
    stripped = text.strip()
    tagged = _TAGGED.findall(stripped)
    candidates = tagged if tagged else [stripped]
    calls: list[ToolCall] = []
    for chunk in candidates:
        try:
            value = json.loads(chunk)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"],
                                  json.dumps(args, ensure_ascii=False)))
    return calls or None


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that has begun like this could still turn out to be a tool call (a
    stream holds such text back until the reply is complete)."""
    head = text.lstrip()[:11]
    return not head or head[0] in "{[" or "<tool_call>".startswith(head) or head.startswith("<tool_call>")
