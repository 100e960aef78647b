"""Dataset rows -> one conversation model. Each converter names the row and key it rejects.

Formats (how a row is laid out): alpaca, sharegpt, openai. Kinds (what a stage needs):
  sft       a conversation ending with a reply                   (sft)
  pairwise  a prompt + chosen and rejected replies               (rm, dpo, orpo, simpo)
  kto       a conversation + kto_tag (desirable or not)          (kto)
  prompt    a prompt only (a final reply, if any, is dropped)    (ppo)
  text      plain text                                           (pt)
  cls       text + label                                         (classification)
  tagging   words + one tag per word                             (token classification)
  seq2seq   a source text + a target text                        (encoder-decoder models)
  qa        context + question + answers at character offsets    (extractive QA)
  embed     anchor + positive (+ negative, or a score)            (sentence embeddings)
Every converter returns a plain dict (a `datasets` row) or raises DataError.
"""

from __future__ import annotations

import json
from typing import Any

from lathe.data.conversation import PROMPT_ROLES, RESPONSE_ROLES, Conversation, Message
from lathe.data.registry import DatasetSpec
from lathe.data.sources import Row
from lathe.errors import DataError

KINDS = ("sft", "pairwise", "kto", "prompt", "text", "cls", "tagging", "seq2seq", "qa", "embed")
STAGE_KIND = {"sft": "sft", "pt": "text", "rm": "pairwise", "dpo": "pairwise", "kto": "kto",
              "ppo": "prompt", "cls": "cls", "tagging": "tagging", "seq2seq": "seq2seq",
              "qa": "qa", "embed": "embed"}
_KIND_WANTS = {
    "sft": "instruction data (a prompt and a response)",
    "pairwise": "preference pairs (ranking: true with chosen and rejected)",
    "kto": "conversations with a kto_tag column (true/false)",
    "prompt": "prompts",
    "text": "plain text (a text column or .txt lines)",
    "cls": "text with a label column",
    "tagging": "words with a tag each (tokens and tags columns, or a CoNLL file)",
    "seq2seq": "source and target texts (or alpaca rows: the prompt is the source)",
    "qa": "a context, a question and answers with their character starts (SQuAD layout)",
    "embed": "text pairs: anchor and positive (+ a hard negative, or a similarity score)",
}


def convert(row: Row, spec: DatasetSpec, kind: str) -> dict[str, Any]:
    """One source row -> the row a stage of `kind` consumes."""
    if kind == "text":
        return {"text": _text_field(row, spec, "text", fallback="prompt"), "origin": row.where}
    if kind == "cls":
        return _classification(row, spec)
    if kind == "tagging":
        return _tagged_words(row, spec)
    if kind == "seq2seq":
        return _source_target(row, spec)
    if kind == "qa":
        return _question(row, spec)
    if kind == "embed":
        return _text_pair(row, spec)
    if kind == "pairwise":
        return _pairwise(row, spec)
    if spec.ranking:
        raise DataError(
            f"dataset {spec.name!r} is preference data (ranking: true) but this stage wants "
            f"{_KIND_WANTS[kind]}; use it with stage rm or dpo, or drop ranking"
        )
    conv = conversation(row, spec, need_response=kind in ("sft", "kto"))
    if kind == "prompt":
        if conv.messages[-1].role in RESPONSE_ROLES:
            conv = Conversation(conv.messages[:-1], conv.system, conv.tools, conv.origin)
        return conv.to_row()
    out = conv.to_row()
    if kind == "kto":
        out["kto_tag"] = _kto_tag(row, spec)
    return out


def _classification(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """text (+ text_pair) and the label as written (JSON text, so its type survives: the label
    set is decided over all rows, lathe.data.tasks)."""
    column = spec.column("label") or "label"
    label = row.data.get(column)
    if label is None or (isinstance(label, str) and not label.strip()) or label == []:
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(f"{row.where}: column {column!r} (label) is missing or empty; the row has: {have}. "
                        "Fix the row or map columns.label in dataset_info.json")
    if isinstance(label, list):
        bad = next((x for x in label if not isinstance(x, (str, int)) or isinstance(x, bool)), None)
        if bad is not None or not label:
            raise DataError(f"{row.where}: column {column!r}: a multi-label row lists class names or ids, "
                            f"got {bad!r:.60}")
    elif not isinstance(label, (str, int, float, bool)):
        raise DataError(f"{row.where}: column {column!r}: a label is a class name, an id, a number or a list "
                        f"of classes, got {type(label).__name__}")
    out = {"text": _text_field(row, spec, "text", fallback="prompt"), "text_pair": "",
           "label": json.dumps(label, ensure_ascii=False), "origin": row.where}
    pair = spec.column("text_pair")
    if pair and row.data.get(pair) is not None:
        out["text_pair"] = _text(row, pair, required=True, role="text_pair")
    return out


def _tagged_words(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """tokens (a list of words) and tags (one per word: a name such as B-PER, or an id into
    label_names), kept as JSON text like a classification label."""
    found = {}
    for role in ("tokens", "tags"):
        column = spec.column(role) or role
        value = row.data.get(column)
        if not isinstance(value, list) or not value:
            have = ", ".join(sorted(row.data)) or "none"
            what = "missing" if value is None else f"a {type(value).__name__}, not a non-empty list"
            raise DataError(f"{row.where}: column {column!r} ({role}) is {what}; the row has: {have}. "
                            f"A tagging row has a list of words and a list of tags, one per word "
                            f"(map columns.{role} in dataset_info.json)")
        found[role] = value
    words, tags = found["tokens"], found["tags"]
    if len(words) != len(tags):
        raise DataError(f"{row.where}: {len(words)} tokens but {len(tags)} tags; each word needs exactly one tag")
    bad = next((w for w in words if not isinstance(w, str) or not w.strip()), None)
    if bad is not None:
        raise DataError(f"{row.where}: token {bad!r:.40} is not a word; tokens are non-empty strings")
    bad = next((t for t in tags if not isinstance(t, (str, int)) or isinstance(t, bool)), None)
    if bad is not None:
        raise DataError(f"{row.where}: tag {bad!r:.40} is neither a tag name nor an id")
    return {"tokens": words, "tags": json.dumps(tags, ensure_ascii=False), "origin": row.where}


def _source_target(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """source and target columns; without a source column, an alpaca row's prompt (instruction
    and input, a line apart) is the source and its response the target."""
    source_col, target_col = spec.column("source") or "source", spec.column("target") or "target"
    if source_col in row.data:
        source = _text(row, source_col, required=True, role="source")
        target = _text(row, target_col, required=True, role="target")
    else:
        if spec.column("prompt") not in row.data:
            have = ", ".join(sorted(row.data)) or "none"
            raise DataError(f"{row.where}: column {source_col!r} (source) is missing; the row has: {have}. "
                            "A seq2seq row has source and target (map columns.source / columns.target in "
                            "dataset_info.json), or alpaca's instruction / input / output")
        prompt = _text(row, spec.column("prompt"), required=True, role="prompt")
        query = _text(row, spec.column("query"), required=False, role="query")
        source = "\n".join(x for x in (prompt, query) if x)
        target = _text(row, spec.column("response"), required=True, role="response")
    for role, value in (("source", source), ("target", target)):
        if not value.strip():
            raise DataError(f"{row.where}: the {role} text is empty; there is nothing to learn from")
    return {"source": source, "target": target, "origin": row.where}


def _question(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """context, question and answers in SQuAD's layout: {"text": [...], "answer_start": [...]}
    (or a list of {"text", "answer_start"}); every answer must be found at its start offset in
    the context. No answers: the question has none in this context (SQuAD 2.0)."""
    context = _text(row, spec.column("context") or "context", required=True, role="context")
    question = _text(row, spec.column("question") or "question", required=True, role="question")
    column = spec.column("answers") or "answers"
    raw = row.data.get(column)
    if isinstance(raw, dict):
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{row.where}: {column!r} must hold equal lists 'text' and 'answer_start' "
                            "(SQuAD's layout)")
        answers = list(zip(texts, starts))
    elif isinstance(raw, list):
        if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in raw):
            raise DataError(f"{row.where}: {column!r}: each answer needs 'text' and 'answer_start'")
        answers = [(a["text"], a["answer_start"]) for a in raw]
    else:
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(f"{row.where}: column {column!r} (answers) is missing or not a list; the row has: {have}. "
                        "Give {\"text\": [...], \"answer_start\": [...]} (an empty list: no answer)")
    for text, start in answers:
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{row.where}: answer {text!r:.40} at {start!r}: an answer is a non-empty text and "
                            "the character offset where it starts in the context")
        found = context[start:start + len(text)]
        if found != text:
            near = context.find(text)
            hint = f" (it occurs at {near})" if near >= 0 else " (it does not occur in the context)"
            raise DataError(f"{row.where}: answer {text!r:.60} is not at its start offset {start}: the context "
                            f"there reads {found!r:.60}{hint}; fix answer_start")
    return {"context": context, "question": question, "answers": json.dumps(answers, ensure_ascii=False),
            "origin": row.where}


def _text_pair(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """anchor and positive texts (a query and its passage, or two paraphrases), and either a
    hard negative text or a similarity score (for example 0 to 1) for the pair."""
    out: dict[str, Any] = {"origin": row.where}
    for role in ("anchor", "positive"):
        out[role] = _text(row, spec.column(role) or role, required=True, role=role)
        if not out[role].strip():
            raise DataError(f"{row.where}: the {role} text is empty")
    negative = spec.column("negative") or "negative"
    out["negative"] = _text(row, negative, required=True, role="negative") \
        if row.data.get(negative) is not None else ""
    score = row.data.get(spec.column("score") or "score")
    if score is not None and score != "":
        try:
            out["score"] = float(score)
        except (TypeError, ValueError):
            raise DataError(f"{row.where}: score {score!r:.40} is not a number; a pair's score is its "
                            "similarity, e.g. from 0 to 1") from None
    else:
        out["score"] = None
    return out


def conversation(row: Row, spec: DatasetSpec, need_response: bool) -> Conversation:
    """The row's messages (with system and tools), checked to alternate."""
    if spec.formatting == "alpaca":
        messages, system, tools = _alpaca_messages(row, spec, need_response)
    else:
        messages, system, tools = _sharegpt_messages(row, spec)
    _check_alternation(messages, row, spec, ends_with_response=need_response)
    return Conversation(tuple(messages), system=system or spec.system_prompt, tools=tools,
                        origin=row.where)


# --- alpaca ---------------------------------------------------------------------------

def _alpaca_messages(row: Row, spec: DatasetSpec, need_response: bool):
    prompt = _text(row, spec.column("prompt"), required=True, role="prompt")
    query = _text(row, spec.column("query"), required=False, role="query")
    messages = _history(row, spec.column("history"))
    messages.append(Message("user", "\n".join(x for x in (prompt, query) if x)))
    response_col = spec.column("response")
    if need_response or (response_col and row.data.get(response_col) is not None):
        messages.append(Message("assistant", _text(row, response_col, required=True, role="response")))
    system = _text(row, spec.column("system"), required=False, role="system") or None
    return messages, system, _tools(row, spec)


def _history(row: Row, column: str | None) -> list[Message]:
    if not column or row.data.get(column) is None:
        return []
    history = row.data[column]
    if not isinstance(history, list):
        raise DataError(
            f"{row.where}: {column!r} must be a list of [user, assistant] pairs, got {type(history).__name__}"
        )
    out: list[Message] = []
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(
                f"{row.where}: {column}[{j}] must be a pair of strings [user, assistant], got {pair!r:.80}"
            )
        out += [Message("user", pair[0]), Message("assistant", pair[1])]
    return out


# --- sharegpt / openai ------------------------------------------------------------------

def _roles_by_tag(spec: DatasetSpec) -> dict[str, str]:
    t = spec.tags
    return {t["user_tag"]: "user", t["assistant_tag"]: "assistant",
            t["observation_tag"]: "observation", t["function_tag"]: "function",
            t["system_tag"]: "system"}


def _sharegpt_messages(row: Row, spec: DatasetSpec):
    column = spec.column("messages")
    raw = row.data.get(column) if column else None
    if raw is None:
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(
            f"{row.where}: column {column!r} (messages) is missing; the row has: {have}. "
            "Fix the row or map columns.messages in dataset_info.json"
        )
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{row.where}: {column!r} must be a non-empty list of messages")
    messages = [_message(m, j, row, spec, column) for j, m in enumerate(raw)]
    system = _text(row, spec.column("system"), required=False, role="system") or None
    if messages and messages[0].role == "system":
        system = messages[0].content
        messages = messages[1:]
    for j, m in enumerate(messages):
        if m.role == "system":
            raise DataError(f"{row.where}: {column}[{j + 1}] is a system message; only the first may be")
    return messages, system, _tools(row, spec)


def _message(m: Any, j: int, row: Row, spec: DatasetSpec, column: str) -> Message:
    t = spec.tags
    if not isinstance(m, dict):
        raise DataError(f"{row.where}: {column}[{j}] must be an object, got {type(m).__name__}")
    roles = _roles_by_tag(spec)
    tag = m.get(t["role_tag"])
    if tag not in roles:
        raise DataError(
            f"{row.where}: {column}[{j}].{t['role_tag']} is {tag!r}; expected one of "
            f"{', '.join(repr(k) for k in roles)} (set tags in dataset_info.json if yours differ)"
        )
    content = m.get(t["content_tag"])
    if isinstance(content, (dict, list)) and roles[tag] == "function":
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise DataError(
            f"{row.where}: {column}[{j}].{t['content_tag']} must be a string, got {type(content).__name__}"
        )
    return Message(roles[tag], content)


def _check_alternation(messages: list[Message], row: Row, spec: DatasetSpec,
                       ends_with_response: bool) -> None:
    where = f"{row.where}: {spec.column('messages') or 'messages'}"
    if not messages:
        raise DataError(f"{where} has no messages besides the system prompt")
    for j, m in enumerate(messages):
        want = PROMPT_ROLES if j % 2 == 0 else RESPONSE_ROLES
        if m.role not in want:
            raise DataError(
                f"{where}: message {j} is {m.role!r} but roles must alternate "
                f"(user/observation, then assistant/function, ...); expected {' or '.join(want)}"
            )
    if ends_with_response:
        if messages[-1].role not in RESPONSE_ROLES:
            raise DataError(f"{where}: the last message is from {messages[-1].role!r}; it must be a reply to train on")
        if not messages[-1].content.strip():
            raise DataError(f"{where}: the last reply is empty; there is nothing to train on")


# --- preference and KTO ---------------------------------------------------------------

def _pairwise(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    if not spec.ranking:
        raise DataError(
            f"dataset {spec.name!r} is not preference data; stages rm/dpo want "
            f"{_KIND_WANTS['pairwise']}: set ranking: true and map chosen/rejected columns"
        )
    conv = conversation(row, spec, need_response=False)
    if conv.messages[-1].role not in PROMPT_ROLES:
        raise DataError(f"{row.where}: the prompt of a preference pair must end with a user message")
    replies = {}
    for which in ("chosen", "rejected"):
        col = spec.column(which)
        value = row.data.get(col) if col else None
        if isinstance(value, dict):  # sharegpt style: {"from": "gpt", "value": "..."}
            value = value.get(spec.tags.get("content_tag", "value"))
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{row.where}: preference data needs both chosen and rejected; column {col!r} "
                f"({which}) is missing or empty"
            )
        replies[which] = value
    out = conv.to_row()
    out.update(replies)
    return out


def _kto_tag(row: Row, spec: DatasetSpec) -> bool:
    col = spec.column("kto_tag") or "kto_tag"
    value = row.data.get(col)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise DataError(
            f"{row.where}: column {col!r} (kto_tag) must be true or false, got {value!r:.40}; "
            "map columns.kto_tag in dataset_info.json"
        )
    return value


# --- fields --------------------------------------------------------------------------

def _text(row: Row, column: str | None, *, required: bool, role: str) -> str:
    if column is None:
        if required:
            raise DataError(f"{row.where}: no column is mapped to {role!r} in dataset_info.json")
        return ""
    if column not in row.data or row.data[column] is None:
        if not required:
            return ""
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(
            f"{row.where}: column {column!r} ({role}) is missing; the row has: {have}. "
            f"Fix the row or map columns.{role} in dataset_info.json"
        )
    value = row.data[column]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {column!r} must be a string, got {type(value).__name__}")
    if required and role == "response" and not value.strip():
        raise DataError(f"{row.where}: column {column!r} ({role}) is empty; there is nothing to train on")
    return value


def _text_field(row: Row, spec: DatasetSpec, role: str, fallback: str) -> str:
    col = spec.column(role)
    if col not in row.data and spec.column(fallback) in row.data:
        col = spec.column(fallback)
    text = _text(row, col, required=True, role=role)
    if not text.strip():
        raise DataError(f"{row.where}: column {col!r} ({role}) is empty")
    return text


def _tools(row: Row, spec: DatasetSpec) -> str | None:
    col = spec.column("tools")
    value = row.data.get(col) if col else None
    if value is None or value == "":
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {col!r} (tools) must be a JSON string or list")
    return value


def alpaca_to_conversation(row: Row, spec: DatasetSpec) -> Conversation:
    """Kept for callers that want the typed object of an SFT row."""
    return conversation(row, spec, need_response=True)
