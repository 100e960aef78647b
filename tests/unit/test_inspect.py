"""The data report's pure pieces: statistics, truncation, padding, duplicates, warnings."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from lathe.data import inspect as di
from lathe.data.inspect import RowLengths
from lathe.data.processors import IGNORE_INDEX
from lathe.data.templates import Template, get_template

# --- statistics ------------------------------------------------------------------------

def test_length_stats_of_known_values():
    s = di.length_stats(list(range(1, 21)))
    assert s == {"min": 1, "median": 10.5, "p95": 19, "max": 20, "mean": 10.5}


def test_length_stats_single_and_empty():
    assert di.length_stats([7]) == {"min": 7, "median": 7, "p95": 7, "max": 7, "mean": 7.0}
    assert set(di.length_stats([]).values()) == {None}


def test_length_stats_are_ordered_on_random_data():
    rng = random.Random(0)
    for _ in range(200):
        values = [rng.randint(1, 5000) for _ in range(rng.randint(1, 60))]
        s = di.length_stats(values)
        assert s["min"] <= s["median"] <= s["p95"] <= s["max"]
        assert s["p95"] in values  # nearest rank: a length that occurs


def test_percentile_nearest_rank():
    assert di.percentile([5, 1, 3, 2, 4], 50) == 3
    assert di.percentile([5, 1, 3, 2, 4], 95) == 5
    assert di.percentile([5, 1, 3, 2, 4], 0) == 1
    with pytest.raises(ValueError):
        di.percentile([], 50)


# --- per-row lengths and truncation ----------------------------------------------------

def test_row_lengths_count_trained_tokens_before_and_after_the_cut():
    full = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE_INDEX] * 3 + [4, 5, 6]}
    kept = {"input_ids": [2, 3, 4, 5], "labels": [IGNORE_INDEX] * 2 + [4, 5]}
    r = di.row_lengths(full, kept)
    assert (r.prompt, r.response, r.total, r.kept_total, r.kept_trained) == (3, 3, 6, 4, 2)
    assert not r.dropped
    assert di.row_lengths(full, {"input_ids": [1, 2], "labels": [IGNORE_INDEX] * 2}).dropped


def test_truncation_summary_counts_add_up():
    rows = [
        RowLengths(prompt=4, response=4, kept_total=8, kept_trained=4),   # fits (8 <= 10)
        RowLengths(prompt=5, response=5, kept_total=10, kept_trained=5),  # fits exactly
        RowLengths(prompt=8, response=8, kept_total=10, kept_trained=5),  # cut
        RowLengths(prompt=20, response=3, kept_total=10, kept_trained=0),  # dropped
    ]
    t = di.truncation_summary(rows, cutoff_len=10)
    assert (t["rows"], t["fit"], t["cut"], t["dropped"]) == (4, 2, 1, 1)
    assert t["fit"] + t["cut"] + t["dropped"] == t["rows"]
    assert t["tokens_removed"] == (16 - 10) + 23  # a dropped row loses everything
    assert t["trained_tokens_removed"] == (8 - 5) + 3
    assert (t["tokens_kept"], t["trained_tokens_kept"]) == (8 + 10 + 10, 4 + 5 + 5)
    assert t["tokens_kept"] + t["tokens_removed"] == sum(r.total for r in rows)


# --- padding ---------------------------------------------------------------------------

def test_build_report_figures():
    rows = [RowLengths(3, 2, 5, 2), RowLengths(10, 10, 8, 4), RowLengths(1, 1, 2, 1),
            RowLengths(30, 5, 8, 0)]
    report = di.build_report(rows, cutoff_len=8, batch_size=1, pad_to_multiple_of=1)
    assert report["rows"] == 4
    assert report["lengths"]["total"]["max"] == 35 and report["lengths"]["prompt"]["min"] == 1
    assert report["truncation"]["dropped"] == 1 and report["truncation"]["cut"] == 1
    # kept rows only (5, 8, 2): one per batch pads nothing; packed into [8] [5, 2]
    p = report["padding"]
    assert p["without_packing"] == 0.0 and p["with_packing"] == 0.0 and p["packed_rows"] == 2
    # two per batch: whichever pair shares a batch, the packed rows [8] [7] waste less
    p = di.build_report(rows, cutoff_len=8, batch_size=2, pad_to_multiple_of=1)["padding"]
    assert 0.0 < p["with_packing"] < p["without_packing"] < 0.5
    assert p["with_packing"] == pytest.approx(round(1 / 16, 4))  # [8, 7]: 16 slots, 15 real
    # padding-free rows are no longer than a batch's longest example: two examples never share
    # one here, so they pad as much as padded batches; with four a batch, [8] [5, 2] -> 16 slots
    assert p["padding_free"] == p["without_packing"]
    four = di.build_report(rows, cutoff_len=8, batch_size=4, pad_to_multiple_of=1)["padding"]
    assert four["padding_free"] == pytest.approx(round(1 / 16, 4))
    assert four["without_packing"] == pytest.approx(round(1 - 15 / 24, 4))
    # every batch is rounded up to a multiple of 8: [2] alone still takes 8 slots
    assert di.build_report(rows, 8, batch_size=1)["padding"]["without_packing"] == pytest.approx(
        round(1 - 15 / 24, 4))


# --- duplicates and empty replies ------------------------------------------------------

def _row(*contents: str, system: str = "", origin: str = "f row 0") -> dict:
    roles = ["user", "assistant"] * (len(contents) // 2)
    return {"roles": roles, "contents": list(contents), "system": system, "tools": "", "origin": origin}


def test_duplicates_ignore_where_a_row_came_from():
    rows = [_row("a", "b", origin="f row 0"), _row("a", "b", origin="f row 1"),
            _row("a", "b", system="s", origin="f row 2"), _row("a", "c", origin="f row 3"),
            _row("a", "b", origin="g row 9")]
    assert di.duplicate_rows(rows) == [("f row 1", "f row 0"), ("g row 9", "f row 0")]
    assert di.duplicate_rows(rows[2:4]) == []


def test_empty_replies_in_any_turn():
    rows = [_row("q", "a", origin="r0"), _row("q", "  ", "q2", "a2", origin="r1"),
            _row("q", "\n", origin="r2"), _row("", "a", origin="r3")]
    assert di.empty_replies(rows) == ["r1", "r2"]  # an empty question is not a reply


# --- warnings --------------------------------------------------------------------------

def test_templates_that_end_replies_give_no_warning():
    tok = SimpleNamespace(eos_token="</s>")
    from lathe.data.templates import TEMPLATES

    # every registered template ends replies (efficient_eos ones with the next turn's opener)
    assert len(TEMPLATES.names()) >= 19
    for name in TEMPLATES:
        assert di.template_warnings(get_template(name), tok) == [], name


def test_reply_without_end_token_warns():
    tok = SimpleNamespace(eos_token="</s>")
    (msg,) = di.template_warnings(Template(name="open", assistant="{content}\n"), tok)
    assert "'open'" in msg and "end token" in msg
    # a stop word the assistant turn never writes is not learned either
    odd = Template(name="odd", assistant="{content}\n", stop_words=("<|end|>",))
    assert len(di.template_warnings(odd, tok)) == 1
    ok = Template(name="ok", assistant="{content}<|end|>", stop_words=("<|end|>",))
    assert di.template_warnings(ok, tok) == []


def test_tokenizer_without_eos_warns():
    warnings = di.template_warnings(get_template("default"), SimpleNamespace(eos_token=None))
    assert len(warnings) == 1 and "no eos_token" in warnings[0]


def test_data_warnings():
    trunc = {"rows": 10, "cutoff_len": 64, "fit": 7, "cut": 1, "dropped": 2}
    out = di.data_warnings(trunc, [("f row 4", "f row 1")], ["f row 3"], dropped_empty=0)
    text = "\n".join(out)
    assert len(out) == 4
    assert "1 of 10 rows has an empty reply (e.g. f row 3)" in text
    assert "2 of 10 rows are dropped" in text and "cutoff_len=64" in text
    assert "1 of 10 rows is longer than cutoff_len=64" in text
    assert "f row 4 repeats f row 1" in text and "dedup: true" in text
    clean = {"rows": 100, "cutoff_len": 64, "fit": 95, "cut": 5, "dropped": 0}
    assert di.data_warnings(clean, [], []) == []  # a few cut rows are normal


# --- marking and the text ---------------------------------------------------------------

class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)


def test_mark_trained_plain_and_colour():
    ids, labels = [0, 1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert di.mark_trained(ids, labels, _Tok(), color=False) == "ab[[cd]]e"
    coloured = di.mark_trained(ids, labels, _Tok(), color=True)
    assert f"{di.GREEN}cd{di.RESET}" in coloured and "[[" not in coloured


def test_format_report_shows_examples_figures_and_warnings():
    rows = [RowLengths(3, 2, 5, 2), RowLengths(10, 10, 8, 4)]
    report = di.build_report(rows, cutoff_len=8, batch_size=2)
    report.update(config={"dataset": ["mine"], "template": "chatml", "cutoff_len": 8},
                  examples=[{"origin": "f row 0", "tokens": 5, "trained": 2}],
                  duplicates={"rows": 0, "dropped_by_dedup": 0}, warnings=["look out"])
    text = di.format_report(report, ["ab[[cd]]"])
    assert "mine (2 rows)" in text and "example 1/1: f row 0, 5 tokens, 2 trained" in text
    assert "ab[[cd]]" in text and "[[...]]" in text
    assert "1 rows fit, 1 cut, 0 dropped" in text
    assert "! look out" in text and "with packing (2 packed rows)" in text
    total = next(line for line in text.splitlines() if line.strip().startswith("total"))
    assert total.split()[1:] == ["5", "12.5", "20", "20", "12.5"]


def test_plot_lengths_writes_a_png(tmp_path):
    path = di.plot_lengths([3, 4, 5, 20], [1, 9, 9, 40], cutoff_len=32, path=tmp_path / "h.png",
                           total=[4, 13, 14, 60])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
