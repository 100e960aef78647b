"""A Template written as a Jinja chat_template, for tokenizers that leave Lathe.

An exported model carries the template it was trained with as `tokenizer.chat_template`,
so that `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` in any
transformers program renders, token for token, what `Template.encode_prompt` renders
(and a whole conversation what `Template.encode_turns` renders). The generated Jinja
mirrors `Template.turn_pieces` step by step; keep the two in step (export verifies it).

What the Jinja receives: `messages` (an optional leading system message, then prompt
and reply messages alternating, as Lathe's Conversation), `tools` (a list of schemas,
serialized with `tojson` like a list-valued tools column in the data) and
`add_generation_prompt`. A user turn's format already ends with the assistant header,
so the generation prompt is always there after a user message.

Special tokens ({bos}, {eos}) are written into the Jinja as the strings the tokenizer
had at export time, exactly what `Template.fill` substitutes.
"""

from __future__ import annotations

from lathe.data.templates import _FIELD, AutoTemplate, Template

# Jinja roles of a tool result (Lathe's "observation"), as model templates name it.
OBSERVATION_ROLES = ("tool", "observation", "ipython")


def jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja unescapes like Python)."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f"'{escaped}'"


def format_expr(fmt: str, fields: dict[str, str]) -> str:
    """A Jinja expression for the format string `fmt`; `fields` maps a field name to the
    expression it becomes (a literal string stays text). Fields not in `fields` stay
    literal text, as `_sub` leaves them."""
    parts: list[tuple[bool, str]] = []  # (is text, text or expression)

    def add(is_text: bool, value: str) -> None:
        if is_text and parts and parts[-1][0]:
            parts[-1] = (True, parts[-1][1] + value)
        elif value or not is_text:
            parts.append((is_text, value))

    pos = 0
    for m in _FIELD.finditer(fmt):
        if m.group(1) not in fields:
            continue
        add(True, fmt[pos:m.start()])
        value = fields[m.group(1)]
        add(*((True, value.text) if isinstance(value, Text) else (False, value)))
        pos = m.end()
    add(True, fmt[pos:])
    return " + ".join(jinja_literal(v) if is_text else v for is_text, v in parts) or "''"


class Text(str):
    """A field value that is literal text (a special token), merged with the text around it."""

    @property
    def text(self) -> str:
        return str(self)


def template_to_jinja(template: Template, tokenizer) -> str:
    """The Jinja chat_template that renders like `template` with this tokenizer's bos/eos.

    `template: auto` is already the tokenizer's own Jinja, which is returned unchanged.
    """
    if isinstance(template, AutoTemplate):
        return tokenizer.chat_template
    t = template
    special = {"bos": Text(tokenizer.bos_token or ""), "eos": Text(tokenizer.eos_token or "")}
    fill = {**special, "content": "content", "idx": "idx"}  # Template.fill for a turn
    fixed = {**special, "content": Text(""), "idx": Text("1")}  # fill() with no content: prefix, separator
    clean = " | trim" if t.strip_content else ""
    end = t.suffix + ("{eos}" if t.efficient_eos else "")

    lines = [
        f"{{#- Written by Lathe from its chat template {t.name!r}: renders the token ids the model "
        "was trained on. -#}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}",
        f"{{%- if not system -%}}{{%- set system = {jinja_literal(t.default_system)} -%}}{{%- endif -%}}",
        "{%- if tools -%}{%- set system = "
        + format_expr(t.tools, {"content": "(system or '')", "tools": "(tools | tojson)"})
        + " -%}{%- endif -%}",
    ]
    if t.thought_tags:  # a reply after the last user message shows its thought
        lines.append("{%- set ns = namespace(last_query=turns | length) -%}"
                     "{%- for m in turns -%}{%- if loop.index0 % 2 == 0 and m['role'] == 'user' -%}"
                     "{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}")
    lines += [
        "{%- for m in turns -%}",
        f"{{%- set content = m['content']{clean} -%}}",
        "{%- set idx = (loop.index0 // 2 + 1) | string -%}",
        "{%- if loop.index0 % 2 == 0 -%}",
    ]
    if t.prefix or t.separator:
        lines.append(f"{{%- if loop.first -%}}{{{{- {format_expr(t.prefix, fixed)} -}}}}"
                     f"{{%- else -%}}{{{{- {format_expr(t.separator, fixed)} -}}}}{{%- endif -%}}")
    lines.append("{%- if loop.first and system -%}")
    if t.system_in_user:  # the system text opens the first prompt message (not trimmed)
        lines.append("{%- set content = " + format_expr(t.system, {**special, "content": "system", "idx": Text("1")})
                     + " + content -%}")
    else:
        lines.append("{{- " + format_expr(t.system, {**special, "content": f"(system{clean})", "idx": Text("1")})
                     + " -}}")
    lines.append("{%- endif -%}")
    user = "{{- " + format_expr(t.user, fill) + " -}}"
    if t.observation:
        roles = ", ".join(jinja_literal(r) for r in OBSERVATION_ROLES)
        lines.append(f"{{%- if m['role'] in [{roles}] -%}}{{{{- {format_expr(t.observation, fill)} -}}}}"
                     f"{{%- else -%}}{user}{{%- endif -%}}")
    else:
        lines.append(user)
    lines.append("{%- else -%}")
    if t.thought_tags:
        lines += _thought_lines(t)
    reply = "{{- " + format_expr(t.assistant, fill) + " -}}"
    if t.function:
        lines.append(f"{{%- if m['role'] == 'function' -%}}{{{{- {format_expr(t.function, fill)} -}}}}"
                     f"{{%- else -%}}{reply}{{%- endif -%}}")
    else:
        lines.append(reply)
    if end:  # closes a finished conversation (trained with the last reply)
        lines.append(f"{{%- if loop.last -%}}{{{{- {format_expr(end, fixed)} -}}}}{{%- endif -%}}")
    lines += ["{%- endif -%}", "{%- endfor -%}"]
    return "\n".join(lines)


def _thought_lines(t: Template) -> list[str]:
    """Template._answer: a thought is dropped before the last user message; after it, the
    reply is written with thought_format (the last reply even without a thought)."""
    opening, closing = (jinja_literal(x) for x in t.thought_tags)
    nl = jinja_literal("\n")
    shown = format_expr(t.thought_format, {"content": f"thought.strip({nl})"}) + f" + answer.lstrip({nl})"
    return [
        "{%- set thought = '' -%}{%- set answer = content -%}",
        f"{{%- if {closing} in content -%}}",
        f"{{%- set thought = content.split({closing})[0].rstrip({nl}).split({opening})[-1].lstrip({nl}) -%}}",
        f"{{%- set answer = content.split({closing})[-1].lstrip({nl}) -%}}",
        "{%- endif -%}",
        "{%- if loop.index0 > ns.last_query and (loop.last or thought) -%}",
        f"{{%- set content = {shown} -%}}",
        "{%- else -%}{%- set content = answer -%}{%- endif -%}",
    ]

