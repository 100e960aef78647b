"""stage tagging end to end through the real CLI: a tiny BERT learns a tagging rule from JSON
rows, scored on a CoNLL file (entity F1 rising); a decoder tags with LoRA; predict and export
round trips; bad rows are one line naming file and row."""

from __future__ import annotations

import json

from tests.conftest import as_overrides, run_cli, run_main
from tests.tiny_encoders import write_ner


def _args(model, data, run, **more) -> list[str]:
    return as_overrides({"stage": "tagging", "model_name_or_path": model, "dataset": "ner",
                         "eval_dataset": "ner_test", "dataset_dir": data, "output_dir": run,
                         "per_device_train_batch_size": 16, "learning_rate": 5e-3, "seed": 0,
                         "finetuning_type": "full", **more})


def test_a_tiny_bert_learns_to_tag_and_round_trips(tiny_bert, tmp_path):
    data = write_ner(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_bert, data, run, num_train_epochs=8, eval_strategy="steps", eval_steps=4,
                                learning_rate=2e-3, label_all_tokens=True, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 tags: O, B-LOC, B-PER, I-PER" in r.stdout
    f1 = [json.loads(x)["eval_f1"] for x in (run / "trainer_log.jsonl").read_text().splitlines() if "eval_f1" in x]
    assert len(f1) == 12 and f1[0] <= 0.5 and f1[-1] >= 0.9 and f1[-1] - f1[0] >= 0.4, f1  # entity F1 rises
    report = json.loads((run / "tagging_report.json").read_text())
    assert set(report["per_type"]) == {"PER", "LOC"} and report["f1"] == f1[-1]
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(x["predict"]) == len(x["tokens"]) for x in rows)
    assert rows[0]["origin"].endswith("ner_test.conll line 3")  # after the -DOCSTART- line
    assert all(e["text"] == " ".join(x["tokens"][e["start"]:e["end"]]) for x in rows for e in x["entities"])

    export = tmp_path / "export"
    r = run_cli("export", str(run), f"export_dir={export}")
    assert r.returncode == 0 and "Verification passed" in r.stdout, r.stderr[-2000:]
    r = run_cli("predict", str(export), "eval_dataset=ner_test", f"dataset_dir={data}")
    assert r.returncode == 0, r.stderr[-2000:]
    again = [json.loads(x) for x in (export / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert [x["predict"] for x in again] == [x["predict"] for x in rows]


def test_a_decoder_tags_with_lora(tiny_model, tmp_path):
    data = write_ner(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_model, data, run, finetuning_type="lora", num_train_epochs=6))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaForTokenClassification + LORA adapter" in r.stdout
    assert json.loads((run / "eval_results.json").read_text())["eval_f1"] > 0.5


def test_bad_tagging_rows_are_one_line(tiny_bert, tmp_path):
    data = write_ner(tmp_path / "data")
    (data / "short.json").write_text(json.dumps([{"tokens": ["bob", "went"], "tags": ["B-PER", "O"]},
                                                 {"tokens": ["in", "rome"], "tags": ["O"]}]))
    (data / "odd.conll").write_text("bob B-PER\nin O\nlima B-LOC\n\nbob B-MISC\n")
    (data / "notag.conll").write_text("bob B-PER\nlima\n")
    info = json.loads((data / "dataset_info.json").read_text())
    info.update({k: {"file_name": f"{k}.{'json' if k == 'short' else 'conll'}"} for k in ("short", "odd", "notag")})
    (data / "dataset_info.json").write_text(json.dumps(info))

    def fails(*extra: str) -> str:
        r = run_main("train", *_args(tiny_bert, data, tmp_path / "run", max_steps=1), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    assert "short.json row 1: 2 tokens but 1 tags" in fails("dataset=short")
    assert "odd.conll line 5: eval tag 'B-MISC' never appears in the training rows" in fails("eval_dataset=odd")
    assert "notag.conll line 2: 'lima' has no tag" in fails("eval_dataset=notag")
    assert "label_all_tokens applies only to stage tagging" in fails("stage=cls", "label_all_tokens=true")
