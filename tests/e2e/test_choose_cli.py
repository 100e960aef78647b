"""Choosing the model through the real CLI: a test split evaluated once, k-fold
cross-validation (in this process and in parallel processes), and the bad input of both."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.conftest import as_overrides, one_error, run_cli, run_main
from tests.tiny_encoders import write_sentiment


def _cls_args(tiny_bert: Path, tmp_path: Path) -> dict:
    return {"stage": "cls", "model_name_or_path": tiny_bert, "dataset": "sentiment",
            "dataset_dir": write_sentiment(tmp_path / "data", n_train=60), "finetuning_type": "full",
            "learning_rate": 1e-3, "max_steps": 6, "per_device_train_batch_size": 8, "cutoff_len": 32, "seed": 0}


def test_a_test_split_is_evaluated_once_after_training(tiny_bert, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", *as_overrides({**_cls_args(tiny_bert, tmp_path), "val_size": 0.1, "test_size": 0.2,
                                        "stratify": True, "output_dir": run}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sentiment: 60 rows -> train 42, eval 6, test 12 (stratified by label)" in r.stdout
    test = json.loads((run / "test_results.json").read_text())
    assert 0 <= test["test_accuracy"] <= 1 and "test_f1_macro" in test
    assert "test_accuracy" not in json.loads((run / "eval_results.json").read_text())  # reported apart
    assert "test_accuracy" in json.loads((run / "all_results.json").read_text())
    assert (r.stdout + r.stderr).count("Test (12 rows, evaluated once)") == 1


def test_cross_validation_reports_every_fold_and_continues_after_a_stop(tiny_bert, tmp_path):
    out = tmp_path / "cv"
    args = {**_cls_args(tiny_bert, tmp_path), "folds": 3, "test_size": 0.1, "cv_retrain": True, "output_dir": out}
    r = run_cli("cv", *as_overrides(args))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sentiment: 60 rows -> train 36, eval 18 (fold 2 of 3, stratified by label)" in r.stdout
    summary = json.loads((out / "cv_results.json").read_text())
    accuracy = summary["metrics"]["accuracy"]
    per_fold = [json.loads((out / f"fold-{k}" / "eval_results.json").read_text())["eval_accuracy"]
                for k in (1, 2, 3)]
    assert accuracy["per_fold"] == per_fold
    assert abs(accuracy["mean"] - statistics.fmean(per_fold)) < 1e-9
    assert abs(accuracy["std"] - statistics.stdev(per_fold)) < 1e-9
    assert (out / "cv_results.png").stat().st_size > 5000
    assert "mean +- std" in r.stdout and "accuracy" in r.stdout
    # the retrained model saw every row but the test split, and the test set was scored there only
    assert "sentiment: 60 rows -> train 54, eval 0, test 6 (random)" in r.stdout
    assert "test_accuracy" in summary["full"]["test"] and not (out / "fold-1" / "test_results.json").exists()
    recorded = (out / "fold-3" / "config.yaml").read_text()
    assert "folds: 3" in recorded and "fold: 3" in recorded  # lathe train fold-3/config.yaml repeats it

    # a fold that did not finish runs again; finished ones are kept
    (out / "fold-2" / "all_results.json").unlink()
    r = run_cli("cv", *as_overrides(args))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fold 1: " in r.stdout + r.stderr and "is complete, kept" in r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("is complete, kept") == 3  # folds 1 and 3, and the retrain
    assert (out / "fold-2" / "all_results.json").is_file()
    # the same folder with another config is refused before anything runs
    r = run_cli("cv", *as_overrides({**args, "learning_rate": 5e-4}))
    assert "holds a finished fold of another config (learning_rate" in one_error(r)


def test_folds_run_in_parallel_processes(base_args, tmp_path):
    out = tmp_path / "cv"
    r = run_cli("cv", *as_overrides({**base_args, "val_size": 0, "max_steps": 2, "folds": 2, "cv_parallel": 2,
                                     "output_dir": out}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "started in a process of its own (1 threads" in r.stdout + r.stderr
    for k in (1, 2):
        assert (out / f"fold-{k}" / "eval_results.json").is_file()
        assert f"fold {k} of 2, random" in (out / f"fold-{k}.log").read_text()
    assert len(json.loads((out / "cv_results.json").read_text())["metrics"]["loss"]["per_fold"]) == 2


def test_bad_splits_and_folds_are_one_line_before_anything_is_written(tiny_bert, base_args, tmp_path):
    out = tmp_path / "out"
    cls = {**_cls_args(tiny_bert, tmp_path), "output_dir": out}
    assert "val_size=0.5 + test_size=0.6 = 1.1 leaves nothing to train on" in one_error(
        run_main("train", *as_overrides({**cls, "val_size": 0.5, "test_size": 0.6})))
    assert "folds=1 must be at least 2" in one_error(run_main("cv", *as_overrides({**cls, "folds": 1})))
    assert "lathe cv needs folds: set folds=5" in one_error(run_main("cv", *as_overrides(cls)))
    assert "folds=80 is more than the 60 rows of sentiment left for cross-validation" in one_error(
        run_main("cv", *as_overrides({**cls, "folds": 80})))
    assert "stage sft has no class per row" in one_error(
        run_main("train", *as_overrides({**base_args, "stratify": True, "output_dir": out})))
    assert "either test_size (split off the training data) or test_dataset" in one_error(
        run_main("train", *as_overrides({**cls, "test_size": 0.1, "test_dataset": "sentiment_test"})))
    assert "fold=2 is for lathe train" in one_error(run_main("cv", *as_overrides({**cls, "folds": 3, "fold": 2})))
    assert "each run's held-out fold is its validation set; remove val_size" in one_error(
        run_main("cv", *as_overrides({**cls, "folds": 3, "val_size": 0.1})))
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "already holds files that are not this cross-validation's (notes.txt)" in one_error(
        run_main("cv", *as_overrides({**cls, "folds": 3, "output_dir": mine})))
    assert (mine / "notes.txt").read_text() == "keep"


def test_text_preparation_and_augmentation_reach_training_rows_only(tiny_bert, tmp_path):
    run = tmp_path / "run"
    args = _cls_args(tiny_bert, tmp_path)
    csv = args["dataset_dir"] / "sentiment.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    csv.write_text("\n".join(lines[:1] + [line[:1].upper() + line[1:] for line in lines[1:]]) + "\n", encoding="utf-8")
    r = run_cli("train", *as_overrides({**args, "val_size": 10, "test_size": 10, "lowercase": True,
                                        "unify_punctuation": True, "augment": "swap,delete", "augment_ratio": 1.0,
                                        "output_dir": run}))
    assert r.returncode == 0, r.stderr[-2000:]
    # 60 rows + 60 copies; a held-out row's copy goes nowhere: 40 rows and their 40 copies train
    assert "sentiment: 60 rows -> train 80, eval 10, test 10 (random)" in r.stdout
    assert "augmented  40 of the 80 training rows are augmented copies (50%; swap, delete)" in r.stdout
    assert "rows prepared: 60" in r.stdout  # every sentence began with a capital: counted like cleaning
    recorded = (run / "config.yaml").read_text()
    assert "lowercase: true" in recorded and "augment:\n- swap\n- delete" in recorded  # predict prepares alike


def test_bad_text_options_are_one_line(tiny_bert, base_args, tmp_path):
    cls = {**_cls_args(tiny_bert, tmp_path), "output_dir": tmp_path / "out"}
    assert "augment: 'flip' is not an operation" in one_error(
        run_main("train", *as_overrides({**cls, "augment": "flip"})))
    assert "synonym needs augment_synonyms" in one_error(
        run_main("train", *as_overrides({**cls, "augment": "synonym"})))
    assert "augment: stage pt has no input text" in one_error(
        run_main("train", *as_overrides({**base_args, "stage": "pt", "augment": "swap"})))
    assert "remove_stopwords: stage tagging has a tag for every word" in one_error(
        run_main("train", *as_overrides({**cls, "stage": "tagging", "remove_stopwords": True})))
    assert not (tmp_path / "out").exists()
