"""Sources, mixing, cleaning, caching and streaming through the real loader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lathe.config import load_config
from lathe.data.loader import load_conversations, load_tokenized
from lathe.data.templates import get_template
from lathe.errors import DataError

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_all_types(d: Path) -> dict:
    """The same 20 rows as json, jsonl, csv, parquet, arrow; text as txt; a folder of two."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (d / "a.json").write_text(json.dumps(ROWS))
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    with open(d / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), d / "a.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(d / "saved"))
    arrow = next((d / "saved").glob("*.arrow"))
    (d / "folder").mkdir()
    (d / "folder" / "1.json").write_text(json.dumps(ROWS[:5]))
    (d / "folder" / "2.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[5:]))
    (d / "corpus.txt").write_text("first document\n\nsecond document\n")
    (d / "legacy").mkdir()
    (d / "legacy" / "rows.json").write_text(json.dumps(ROWS[:3]))
    info = {
        "json": {"file_name": "a.json"}, "jsonl": {"file_name": "a.jsonl"},
        "csv": {"file_name": "a.csv"}, "parquet": {"file_name": "a.parquet"},
        "arrow": {"file_name": str(arrow.relative_to(d))}, "folder": {"file_name": "folder"},
        "txt": {"file_name": "corpus.txt"},
        "legacy": {"script_url": "legacy", "columns": {"prompt": "instruction", "query": "input",
                                                      "response": "output", "history": "history"}},
        "hub": {"hf_hub_url": "someone/some-dataset"},
        "dirty": {"file_name": "dirty.json"},
    }
    dirty = [
        {"instruction": "<b>Hello</b>   there", "output": "See https://example.com   now"},
        {"instruction": "<b>Hello</b>   there", "output": "See https://example.com   now"},
        {"instruction": "short", "output": "ok"},
        {"instruction": "empty", "output": ""},
        {"instruction": "fine", "output": "a long enough answer"},
    ]
    (d / "dirty.json").write_text(json.dumps(dirty))
    (d / "dataset_info.json").write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader-data")
    write_all_types(d)
    return d


def cfg(data: Path, **keys):
    return load_config({"model_name_or_path": "x", "output_dir": "o", "dataset_dir": str(data),
                        "template": "chatml", "cutoff_len": 64, **keys}).data


@pytest.mark.parametrize("name", ["json", "jsonl", "csv", "parquet", "arrow", "folder", "legacy"])
def test_every_file_type_gives_the_same_conversations(data, name):
    rows, stats = load_conversations(cfg(data, dataset=name))
    expected = 3 if name == "legacy" else 20
    assert stats.rows_read == {name: expected}
    assert [r["contents"] for r in rows] == [[f"question {i}", f"answer number {i}"] for i in range(expected)]


def test_txt_is_plain_text_for_pretraining(data):
    rows, _ = load_conversations(cfg(data, dataset="txt"), kind="text")
    assert [r["text"] for r in rows] == ["first document", "second document"]
    assert rows[1]["origin"].endswith("corpus.txt line 3")


def test_hub_dataset_offline_is_one_clear_line(data):
    with pytest.raises(DataError, match="cannot load someone/some-dataset from the Hugging Face hub"):
        load_conversations(cfg(data, dataset="hub"))


def test_mixing_max_samples_and_interleaving(data, tokenizer):
    rows, stats = load_conversations(cfg(data, dataset="json,csv", max_samples=4))
    assert stats.rows_read == {"json": 4, "csv": 4} and len(rows) == 8
    d = cfg(data, dataset="json,csv", max_samples=6, mix_strategy="interleave_under",
            interleave_probs="0.5,0.5")
    split = load_tokenized(d, tokenizer, get_template("chatml"), seed=0, kind="sft")
    assert 0 < len(split.train) <= 12
    over = load_tokenized(cfg(data, dataset="json,csv", max_samples=6, mix_strategy="interleave_over"),
                          tokenizer, get_template("chatml"), seed=0, kind="sft")
    assert len(over.train) == 12  # alternating until both are used up


def test_val_size_count_and_eval_dataset(data, tokenizer):
    t = get_template("chatml")
    a = load_tokenized(cfg(data, dataset="json", val_size=5), tokenizer, t, seed=0, kind="sft")
    assert (len(a.train), len(a.eval)) == (15, 5)
    b = load_tokenized(cfg(data, dataset="json", eval_dataset="folder"), tokenizer, t, seed=0, kind="sft")
    assert (len(b.train), len(b.eval)) == (20, 20)


def test_cleaning_counts_what_each_step_removed(data):
    rows, stats = load_conversations(cfg(data, dataset="dirty", strip_html=True, strip_urls=True,
                                         min_response_chars=5, dedup=True))
    assert [r["contents"] for r in rows] == [["Hello there", "See now"], ["fine", "a long enough answer"]]
    assert stats.cleaning == {"rows_cleaned": 2, "dropped_duplicate_rows": 1,
                              "dropped_short_rows": 1, "dropped_empty_response_rows": 1}


def test_cleaning_is_off_by_default_and_empty_replies_are_errors(data):
    with pytest.raises(DataError, match="dirty.json row 3: column 'output' \\(response\\) is empty"):
        load_conversations(cfg(data, dataset="dirty"))


def test_second_run_hits_the_cache_and_overwrite_cache_redoes_it(data, tokenizer):
    t = get_template("chatml")
    first = load_tokenized(cfg(data, dataset="jsonl", max_samples=7), tokenizer, t, seed=1, kind="sft")
    second = load_tokenized(cfg(data, dataset="jsonl", max_samples=7), tokenizer, t, seed=1, kind="sft")
    assert (first.stats.cache, second.stats.cache) == ("miss", "hit")
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.stats.train_tokens == first.stats.train_tokens > 0
    redo = load_tokenized(cfg(data, dataset="jsonl", max_samples=7, overwrite_cache=True),
                          tokenizer, t, seed=1, kind="sft")
    assert redo.stats.cache == "miss"
    workers = load_tokenized(cfg(data, dataset="jsonl", max_samples=7, preprocessing_num_workers=2),
                             tokenizer, t, seed=1, kind="sft")
    assert workers.stats.cache == "hit"  # how fast it is made is not part of the key
    changed = load_tokenized(cfg(data, dataset="jsonl", max_samples=7, cutoff_len=8),
                             tokenizer, t, seed=1, kind="sft")
    assert changed.stats.cache == "miss"  # a different key shapes the data: no stale cache


def test_streaming_yields_the_same_examples(data, tokenizer):
    t = get_template("chatml")
    eager = load_tokenized(cfg(data, dataset="jsonl"), tokenizer, t, seed=0, kind="sft")
    stream = load_tokenized(load_config({"model_name_or_path": "x", "output_dir": "o",
                                         "dataset_dir": str(data), "template": "chatml",
                                         "cutoff_len": 64, "dataset": "jsonl", "streaming": True,
                                         "max_steps": 10, "val_size": 4}).data,
                            tokenizer, t, seed=0, kind="sft")
    streamed = [ex["input_ids"] for ex in stream.train]
    assert len(streamed) == 16 and len([1 for _ in stream.eval]) == 4
    assert streamed == eager.train["input_ids"][4:]


def test_streaming_needs_max_steps(data):
    from lathe.errors import ConfigError

    with pytest.raises(ConfigError, match="streaming: true needs max_steps"):
        cfg(data, dataset="jsonl", streaming=True)
