"""`lathe data inspect` on the tiny model: the report tells the truth about the training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_yaml

PNG = b"\x89PNG\r\n\x1a\n"
LONG = " ".join(["the assistant talks at length about lathes and wood"] * 8)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """Sharegpt rows: short ones that fit, long replies that get cut, two-turn rows whose
    first turn eats a small cutoff_len (dropped when only the last turn is trained), an
    exact duplicate and an empty earlier reply."""
    def conv(*texts: str) -> dict:
        tags = ["human", "gpt"] * (len(texts) // 2)
        return {"conversations": [{"from": f, "value": v} for f, v in zip(tags, texts)]}

    rows = ([conv(f"hi {i}", "hello") for i in range(6)]
            + [conv(f"tell me {i}", LONG) for i in range(4)]
            + [conv(f"first {i}", LONG, "and then?", "done") for i in range(3)]
            + [conv("hi 0", "hello")]  # repeats row 0
            + [conv("q", "", "again", "now an answer")])  # an empty earlier reply
    d = tmp_path_factory.mktemp("chat")
    (d / "chat.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"chat": {"file_name": "chat.json", "formatting": "sharegpt"}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


def _inspect(tmp_path: Path, args: dict, *extra: str):
    return run_cli("data", "inspect", str(write_yaml(tmp_path / "cfg.yaml", args)), *extra, cwd=tmp_path)


def test_report_on_the_tiny_model(tmp_path, base_args):
    proc = _inspect(tmp_path, base_args, "-n", "2", "--output", "out/report.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # examples: trained spans in brackets (stdout is a pipe), no colour codes
    assert "example 1/2" in out and "example 2/2" in out and "example 3/" not in out
    assert out.count("[[") >= 2 and "]]" in out and "\033[" not in out
    assert "<|im_start|>assistant\n[[" in out  # the reply is trained, the prompt is not

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"] == base_args["max_samples"] == 32
    for key in ("prompt", "response", "total"):
        s = report["lengths"][key]
        assert 0 < s["min"] <= s["median"] <= s["p95"] <= s["max"], (key, s)
    lengths = report["lengths"]
    assert lengths["total"]["max"] <= lengths["prompt"]["max"] + lengths["response"]["max"]
    assert lengths["total"]["min"] >= lengths["prompt"]["min"] + lengths["response"]["min"]
    t = report["truncation"]
    assert t["fit"] + t["cut"] + t["dropped"] == t["rows"] == 32
    assert (t["cut"] > 0) == (lengths["total"]["max"] > base_args["cutoff_len"])

    p = report["padding"]
    assert p["batch_size"] == base_args["per_device_train_batch_size"]
    assert 0.0 <= p["without_packing"] < 1.0
    assert 0.0 <= p["with_packing"] < 1.0 and 0 < p["packed_rows"] <= 32 - t["dropped"]
    assert p["with_packing"] < p["without_packing"] and p["padding_free"] <= p["without_packing"]
    assert report["duplicates"]["rows"] >= 0 and isinstance(report["warnings"], list)
    assert [e["trained"] > 0 for e in report["examples"]] == [True, True]
    assert all("[[" in e["text"] for e in report["examples"])

    # the histogram lands in the working directory by default; output_dir is never made
    assert (tmp_path / "data_report_lengths.png").read_bytes()[:8] == PNG
    assert not Path(base_args["output_dir"]).exists()


def test_small_cutoff_reports_cut_and_dropped_rows(tmp_path, base_args, chat_dir):
    args = {**base_args, "dataset": "chat", "dataset_dir": str(chat_dir), "max_samples": None,
            "train_on_last_turn_only": True, "per_device_train_batch_size": 4}
    del args["output_dir"]  # not needed to inspect
    # options first, overrides after them, a custom plot path, colour forced
    proc = _inspect(tmp_path, args, "--plot", "plots/h.png", "--output", "r.json", "--color",
                    "cutoff_len=24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\033[32m" in proc.stdout and "[[" not in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    t = report["truncation"]
    assert t["cutoff_len"] == 24 and t["rows"] == 15
    assert t["dropped"] == 3  # the two-turn rows whose first turn fills the budget
    assert t["cut"] >= 4 and t["fit"] >= 6 and t["fit"] + t["cut"] + t["dropped"] == 15
    assert t["trained_tokens_removed"] > 0
    assert report["lengths"]["total"]["max"] > 24 >= report["lengths"]["total"]["min"]
    assert report["duplicates"]["rows"] == 1
    warnings = "\n".join(report["warnings"])
    assert "3 of 15 rows are dropped" in warnings and "cutoff_len=24" in warnings
    assert "empty reply" in warnings and "row 14" in warnings
    assert "1 row repeats an earlier row" in warnings and "row 13 repeats" in warnings
    assert (tmp_path / "plots" / "h.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "data_report_lengths.png").exists()


def test_unknown_dataset_is_one_line(tmp_path, base_args):
    proc = _inspect(tmp_path, {**base_args, "dataset": "identty"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("DataError:")
    assert "'identty' is not in" in lines[0] and "did you mean identity" in lines[0]
    assert not (tmp_path / "data_report_lengths.png").exists()


def test_figures_match_what_training_loads(tmp_path, base_args, chat_dir, capsys):
    """The inspector and the training data loader agree on rows, tokens and trained tokens."""
    from lathe.config.load import load_config
    from lathe.data.loader import load_sft_data
    from lathe.data.templates import get_template
    from lathe.model.load import load_tokenizer
    from lathe.report import inspect_data

    args = {**base_args, "dataset": "chat", "dataset_dir": str(chat_dir), "max_samples": None,
            "cutoff_len": 24, "train_on_last_turn_only": True}
    report = inspect_data(args, n=1, plot=None, color=False)
    assert "example 1/1" in capsys.readouterr().out

    cfg = load_config(args)
    tokenizer = load_tokenizer(cfg.model, str(base_args["model_name_or_path"]))
    data = load_sft_data(cfg.data, tokenizer, get_template("chatml"), seed=0)
    t = report["truncation"]
    assert data.stats.train_rows == t["rows"] - t["dropped"]
    assert data.stats.dropped_empty_response == t["dropped"]
    kept = [len(ids) for ids in data.train["input_ids"]]
    assert max(kept) <= 24
    assert data.stats.train_tokens == t["tokens_kept"] == sum(kept)
    assert data.stats.trained_tokens == t["trained_tokens_kept"]


def test_template_that_disagrees_with_the_tokenizer_is_flagged(tmp_path, base_args, capsys):
    """The tiny tokenizer carries a ChatML chat_template: chatml agrees, llama3 does not."""
    from lathe.report import inspect_data

    agrees = inspect_data(base_args, n=0, plot=None, color=False)
    assert not any("chat_template" in w for w in agrees["warnings"]), agrees["warnings"]
    differs = inspect_data({**base_args, "template": "llama3"}, n=0, plot=None, color=False)
    flagged = [w for w in differs["warnings"] if "chat_template" in w]
    assert len(flagged) == 1 and "llama3" in flagged[0], differs["warnings"]
    assert "Warnings (" in capsys.readouterr().out
