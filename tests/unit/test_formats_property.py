"""Random and malformed rows through every format and kind: convert, or DataError. Never else."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lathe.data.formats import KINDS, convert
from lathe.data.registry import spec_from_entry
from lathe.data.sources import Row
from lathe.errors import DataError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
KEYS = ["instruction", "input", "output", "history", "system", "conversations", "messages", "tools",
        "chosen", "rejected", "kto_tag", "text", "label", "from", "value", "role", "content"]
message = st.fixed_dictionaries({}, optional={
    "from": st.sampled_from(["human", "gpt", "system", "observation", "function_call", "x"]),
    "value": values,
    "role": st.sampled_from(["user", "assistant", "system", "tool", "function_call", "y"]),
    "content": values,
})
rows = st.dictionaries(st.sampled_from(KEYS), st.one_of(values, st.lists(message, max_size=5),
                                                         st.lists(st.lists(st.text(max_size=5), max_size=3),
                                                                  max_size=3)), max_size=8)
SPECS = [
    spec_from_entry("ds", entry, Path("."), "info.json")
    for entry in (
        {"file_name": "x"},
        {"file_name": "x", "columns": {"history": "history", "system": "system", "tools": "tools"}},
        {"file_name": "x", "ranking": True},
        {"file_name": "x", "formatting": "sharegpt", "columns": {"system": "system", "tools": "tools"}},
        {"file_name": "x", "formatting": "sharegpt", "ranking": True},
        {"file_name": "x", "formatting": "openai"},
        {"file_name": "x", "columns": {"kto_tag": "kto_tag"}},
    )
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, spec_index=st.integers(0, len(SPECS) - 1), kind=st.sampled_from(KINDS))
def test_any_row_converts_or_raises_a_data_error(data, spec_index, kind):
    try:
        out = convert(Row(data, "f.jsonl line 1"), SPECS[spec_index], kind)
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(out, dict) and out["origin"] == "f.jsonl line 1"
    if "roles" in out:
        assert len(out["roles"]) == len(out["contents"]) and all(isinstance(c, str) for c in out["contents"])
