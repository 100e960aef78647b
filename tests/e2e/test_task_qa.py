"""stage qa end to end through the real CLI: a tiny BERT learns to point at answers, scored on
contexts longer than one window (doc_stride windows put back together); predict and export
round trips; a decoder with LoRA; answers that are not where their offset says are one line."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import as_overrides, run_cli
from tests.tiny_encoders import write_qa


def _args(model, data, run, **more) -> list[str]:
    return as_overrides({"stage": "qa", "model_name_or_path": model, "dataset": "qa", "eval_dataset": "qa_test",
                         "dataset_dir": data, "output_dir": run, "per_device_train_batch_size": 16,
                         "learning_rate": 3e-3, "seed": 0, "finetuning_type": "full", "cutoff_len": 32,
                         "doc_stride": 8, **more})


def test_a_tiny_bert_finds_answer_spans_across_windows(tiny_bert, tmp_path):
    data = write_qa(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_bert, data, run, max_steps=64, eval_strategy="steps", eval_steps=4,
                                eval_on_start=True, learning_rate=2e-3, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BertForQuestionAnswering" in r.stdout
    windows = int(re.search(r"eval (\d+);", r.stdout).group(1))
    assert windows > 24  # 24 questions whose contexts need more than one window at cutoff_len 32
    log = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    em = [x["eval_exact_match"] for x in log if "eval_exact_match" in x]
    assert em[0] < 50 and em[-1] >= 85, em  # em[0]: the untrained model (eval_on_start)
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24  # one per question, not per window
    for row in rows:
        context = json.loads((data / "qa_test.json").read_text())[int(row["origin"].rsplit(" ", 1)[1])]["context"]
        assert context[row["start"]:row["start"] + len(row["predict"])] == row["predict"]

    export = tmp_path / "export"
    r = run_cli("export", str(run), f"export_dir={export}")
    assert r.returncode == 0 and "Verification passed" in r.stdout, r.stderr[-2000:]
    r = run_cli("predict", str(export), "eval_dataset=qa_test", f"dataset_dir={data}", "cutoff_len=32",
                "doc_stride=8")
    assert r.returncode == 0, r.stderr[-2000:]
    again = [json.loads(x) for x in (export / "predict" / "predictions.jsonl").read_text().splitlines()]
    same = sum(a["predict"] == b["predict"] for a, b in zip(again, rows))
    assert same >= len(rows) - 1  # the same model (logits verified); a near-tie may flip on float noise


def test_a_decoder_answers_with_lora(tiny_model, tmp_path):
    data = write_qa(tmp_path / "data", n_train=32, n_test=8)
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_model, data, run, finetuning_type="lora", max_steps=4, cutoff_len=64,
                                doc_stride=16))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaForQuestionAnswering + LORA adapter" in r.stdout
    assert {"eval_exact_match", "eval_f1"} <= set(json.loads((run / "eval_results.json").read_text()))


def test_answers_off_their_offset_are_one_line(tiny_bert, tmp_path):
    data = write_qa(tmp_path / "data", n_train=8, n_test=4)
    (data / "bad.json").write_text(json.dumps([
        {"context": "bob lives in rome.", "question": "where does bob live?",
         "answers": {"text": ["rome"], "answer_start": [13]}},
        {"context": "bob lives in rome.", "question": "where does bob live?",
         "answers": {"text": ["rome"], "answer_start": [3]}}]))
    info = json.loads((data / "dataset_info.json").read_text())
    info["bad"] = {"file_name": "bad.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    r = run_cli("train", *_args(tiny_bert, data, tmp_path / "run", dataset="bad", max_steps=1))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bad.json row 1: answer 'rome' is not at its start offset 3: the context there reads ' liv'" \
           " (it occurs at 13); fix answer_start" in r.stderr
    r = run_cli("train", *_args(tiny_bert, data, tmp_path / "run", doc_stride=16, max_steps=1))
    assert r.returncode == 2 and "doc_stride=16 must be less than half of cutoff_len=32" in r.stderr


def test_lora_on_bert_reads_token_types_like_its_export(tiny_bert, tmp_path):
    """peft's QA wrapper drops token_type_ids; Lathe trains through the plain PeftModel, so the
    adapter learns with the token types its merged export is then given."""
    data = write_qa(tmp_path / "data", n_train=64, n_test=16)
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_bert, data, run, finetuning_type="lora", max_steps=12, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    export = tmp_path / "export"
    r = run_cli("export", str(run), f"export_dir={export}")
    assert r.returncode == 0 and "Verification passed" in r.stdout, r.stderr[-2000:]
    r = run_cli("predict", str(export), "eval_dataset=qa_test", f"dataset_dir={data}", "cutoff_len=32",
                "doc_stride=8")
    assert r.returncode == 0, r.stderr[-2000:]
    mine = json.loads((run / "predict_results.json").read_text())
    theirs = json.loads((export / "predict" / "predict_results.json").read_text())
    assert theirs["predict_f1"] == mine["predict_f1"]
    assert theirs["predict_loss"] == pytest.approx(mine["predict_loss"], abs=1e-4)
