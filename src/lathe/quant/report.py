"""The float model and its quantized variants side by side: quantize_report.json, a table on
screen and a bar chart (quantize_report.png).

For each model: size on disk (its weight files), the memory it takes (peak resident memory
of a fresh process once the model is loaded and has run one batch, less what the process
held before), latency (lathe.quant.measure: per example at batch 1 and 32 for task models,
per generated token at batch 1 and 8 for language models; warm, the median of
benchmark_repeats, the better of two rounds over all the models; by the clock and in CPU
time, the steadier of the two where other work shares the cores), and quality on
eval_dataset through `lathe predict`, with the stage's own metrics (perplexity for language
models, accuracy and F1 for classifiers, MSE for regression, entity F1, BLEU-4 and ROUGE,
exact match and F1, MRR).
All models are measured in one run, one after the other, so their figures compare as ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError
from lathe.recipes.common import log

REPORT = "quantize_report.json"
CHART = "quantize_report.png"
GENERATES = ("causal_lm", "seq2seq")
# The quality figure the table shows per stage (every predict metric is in the JSON).
HEADLINE = {"sft": "perplexity", "pt": "perplexity", "cls": "accuracy", "tagging": "f1", "seq2seq": "rouge-l",
            "qa": "f1", "embed": "mrr", "rm": "accuracy"}
_TIMING = ("runtime", "samples_per_second", "steps_per_second", "samples", "preparation_time")


def weights_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 2)


def build_report(cfg: LatheConfig, out: Path, float_dir: Path, tokenizer: Any, template: Any,
                 task: str) -> dict[str, Any]:
    q = cfg.quantize
    models = [("float32", float_dir), (q.quantization_scheme, out)]
    for other in q.quantize_compare or []:
        path = Path(other).expanduser()
        from lathe.model.quant.store import is_quantized_dir, read_layout

        if not is_quantized_dir(path):
            raise ConfigError(f"quantize_compare: {other} is not a quantized model folder (no quantization.json); "
                              "name folders lathe quantize (or a QAT run's quantized/) wrote")
        layout = read_layout(path)
        models.append((f"{layout.get('scheme')} ({layout.get('origin', 'ptq')}, {path.name})", path))
    inputs = _latency_inputs(cfg, tokenizer, template, task)
    rows = []
    for name, folder in models:
        log(f"Measuring {name}: size" + (", memory, latency" if q.benchmark_repeats else "")
            + (", quality" if cfg.data.eval_dataset else ""))
        where = str(folder) if folder != float_dir else cfg.model.model_name_or_path
        row: dict[str, Any] = {"model": name, "folder": where, "size_mb": weights_mb(folder), "latency": {}}
        if q.benchmark_repeats:
            row.update(_measure(folder, task, inputs, q.benchmark_repeats, tokenizer))
        if cfg.data.eval_dataset:
            row["quality"] = _quality(cfg, folder)
        rows.append(row)
    # a second round in the same order: a model timed while something else held the cores is
    # timed again, and each figure is the better of its two medians
    if q.benchmark_repeats:
        log("Timing every model once more")
    for row, (_, folder) in zip(rows, models if q.benchmark_repeats else []):
        again = _measure(folder, task, inputs, q.benchmark_repeats, tokenizer)["latency"]
        for batch, figures in again.items():
            cpu = min(figures["cpu_ms"], row["latency"][batch]["cpu_ms"])
            if figures["ms"] < row["latency"][batch]["ms"]:
                row["latency"][batch] = figures
            row["latency"][batch]["cpu_ms"] = cpu
    report = _ratios(rows, cfg.finetune.stage, task)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(report)
    chart(report, out / CHART)
    log(f"Saved {out / REPORT} and {out / CHART}")
    return report


def _latency_inputs(cfg: LatheConfig, tokenizer: Any, template: Any, task: str) -> list[list[int]]:
    """Token ids of up to 32 eval rows (calibration rows, else two sentences, when there is no eval
    set); a language model's prompts are cut to 32 tokens so every batch generates from the same."""
    names = cfg.data.eval_dataset or cfg.quantize.calibration_dataset
    ids: list[list[int]] = []
    if names:
        try:
            from lathe.quant.calibrate import stage_rows

            rows = stage_rows(cfg, tokenizer, template, list(names))
            ids = [list(rows[i]["input_ids"]) for i in range(min(32, len(rows)))]
        except ConfigError:
            ids = []
    if not ids:
        ids = [tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"], tokenizer("Hello!")["input_ids"]]
    return [r[:32] for r in ids] if task in GENERATES else ids


def _measure(folder: Path, task: str, inputs: list[list[int]], repeats: int, tokenizer: Any) -> dict[str, Any]:
    import torch

    generate = task in GENERATES
    spec = {"model": str(folder), "task": task, "inputs": inputs, "batches": [1, 8] if generate else [1, 32],
            "generate": generate, "new_tokens": 16, "repeats": repeats, "pad_id": tokenizer.pad_token_id or 0,
            "encoder_decoder": task == "seq2seq", "threads": torch.get_num_threads()}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-m", "lathe.quant.measure", f.name], capture_output=True, text=True,
                              env=env)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring {folder} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quality(cfg: LatheConfig, folder: Path) -> dict[str, float]:
    """`lathe predict` on eval_dataset; its metrics without the prefix and the timings."""
    from lathe.api import predict
    from lathe.quant.run import recorded_keys

    keys = {**recorded_keys(cfg), "cutoff_len": cfg.data.cutoff_len}
    from lathe.quiet import debugging

    with tempfile.TemporaryDirectory() as tmp, _silenced(not debugging()):
        keys.update(eval_dataset=cfg.data.eval_dataset, dataset_dir=cfg.data.dataset_dir, report_to="none",
                    output_dir=str(Path(tmp) / "predict"), predict_with_generate=False,
                    max_samples=cfg.data.max_samples)
        result = predict(str(folder), keys)
    return {k.removeprefix("predict_").removeprefix("eval_"): round(float(v), 6) for k, v in result.metrics.items()
            if isinstance(v, (int, float)) and k.startswith(("predict_", "eval_"))
            and not k.endswith(_TIMING)}


@contextlib.contextmanager
def _silenced(on: bool) -> Iterator[None]:
    """predict's own run summary and files list, once per model, would bury the report."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _ratios(rows: list[dict[str, Any]], stage: str, task: str) -> dict[str, Any]:
    base = rows[0]
    big = "8" if task in GENERATES else "32"
    per = "ms_per_token" if task in GENERATES else "ms_per_example"
    for row in rows:
        row["size_ratio"] = round(row["size_mb"] / base["size_mb"], 4)
        for b in row["latency"]:
            mine, theirs = row["latency"][b], base["latency"][b]
            mine["speedup"] = round(theirs[per] / mine[per], 3)
            mine["cpu_speedup"] = round(theirs["cpu_ms"] / mine["cpu_ms"], 3) if mine.get("cpu_ms") else None
    return {"stage": stage, "task": task, "per": per, "batches": list(base["latency"]), "large_batch": big,
            "headline": HEADLINE.get(stage), "threads": _threads(), "models": rows}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def print_table(report: dict[str, Any]) -> None:
    per, head = report["per"], report["headline"]
    unit = per.removeprefix("ms_per_")
    cols = [f"{unit} ms @{b} (x, cpu x)" for b in report["batches"]]
    header = f"{'model':<34} {'size MB':>9} {'x':>6} {'mem MB':>8} " + " ".join(f"{c:>26}" for c in cols)
    if head:
        header += f" {head:>11}"
    print(header)
    for row in report["models"]:
        mem = f"{row['peak_mb']:>8.0f}" if "peak_mb" in row else f"{'-':>8}"
        line = f"{row['model'][:34]:<34} {row['size_mb']:>9.1f} {row['size_ratio']:>6.2f} {mem} "
        line += " ".join(f"{_cell(row['latency'][b], per):>26}" for b in report["batches"])
        if head:
            value = (row.get("quality") or {}).get(head)
            line += f" {value:>11.4f}" if value is not None else f" {'-':>11}"
        print(line)


def _cell(figures: dict[str, Any], per: str) -> str:
    cpu = figures.get("cpu_speedup")
    return f"{figures[per]:.3f} ({figures['speedup']:.2f}x" + (f", {cpu:.2f}x)" if cpu else ")")


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    names = [r["model"] for r in rows]
    big, per = report["large_batch"], report["per"]
    panels = [("size on disk (MB)", [r["size_mb"] for r in rows])]
    if report["batches"]:  # timed (benchmark_repeats > 0)
        panels.append((f"{per.replace('_', ' ')} at batch {big}", [r["latency"][big][per] for r in rows]))
    head = report["headline"]
    if head and all((r.get("quality") or {}).get(head) is not None for r in rows):
        panels.append((head, [r["quality"][head] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, (title, values) in zip(list(axes[0]), panels):
        bars = ax.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(values)), [n[:18] for n in names], rotation=20, fontsize=8, ha="right")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"quantization: stage {report['stage']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
