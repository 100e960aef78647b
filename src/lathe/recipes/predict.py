"""do_predict: after training (or instead of it), predict on the eval set.

With `predict_with_generate`, every eval row's last reply is generated from the prompt
before it and scored against the reference (BLEU-4, ROUGE-1/2/L), written as
generated_predictions.jsonl + predict_results.json; without it, the eval set's loss and
perplexity go to predict_results.json.

Several processes: each generates its own stride of the rows, rank 0 gathers them in
order and alone writes the files (the loss path is the Trainer's own distributed loop).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.processors import IGNORE_INDEX
from lathe.errors import ConfigError
from lathe.recipes.common import is_main_process, log

PREDICTIONS_FILE = "generated_predictions.jsonl"


def check_predict(cfg: LatheConfig) -> None:
    """Stages without chat replies (pt) predict the loss only; refuse generate up front."""
    if cfg.train.do_predict and cfg.train.predict_with_generate and cfg.finetune.stage != "sft":
        raise ConfigError(
            f"predict_with_generate needs replies to compare with, which stage {cfg.finetune.stage} "
            "has not; drop predict_with_generate (do_predict then reports predict_loss and "
            "predict_perplexity) or use stage: sft"
        )


def run_predict(trainer: Any, cfg: LatheConfig, tokenizer: Any, template: Any = None,
                eval_rows: Any = None) -> dict[str, float]:
    """predict_* metrics (written to predict_results.json and all_results.json)."""
    check_predict(cfg)
    if cfg.train.predict_with_generate:
        rows = eval_rows if eval_rows is not None else trainer.eval_dataset
        if cfg.data.train_on_prompt:  # labels then cover the prompt too: re-tokenize without
            rows = _rows_with_prompt_masked(cfg, tokenizer, template)
        metrics = predict_with_generate(trainer.model, tokenizer, template, rows, cfg)
    else:
        metrics = predict_loss(trainer)
    trainer.save_metrics("predict", metrics)  # rank 0 only
    return metrics


# --- loss ---------------------------------------------------------------------------------

def predict_loss(trainer: Any) -> dict[str, float]:
    """Loss and perplexity on the eval set, through the Trainer's loop (no callbacks fire,
    so early stopping and the training log do not see it)."""
    start = time.time()
    out = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="Prediction",
                                  prediction_loss_only=True, metric_key_prefix="predict")
    runtime = time.time() - start
    loss = float(out.metrics["predict_loss"])
    metrics = {"predict_loss": loss, "predict_perplexity": math.exp(min(loss, 50.0)),
               "predict_samples": out.num_samples, "predict_runtime": round(runtime, 4),
               "predict_samples_per_second": round(out.num_samples / max(runtime, 1e-9), 3)}
    log(f"Predict loss {loss:.4f}, perplexity {metrics['predict_perplexity']:.2f} "
        f"on {out.num_samples} rows")
    return metrics


# --- generation -----------------------------------------------------------------------

def split_row(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, last reply) of a tokenized sft row: the reply is the trailing run of
    trained tokens, the prompt everything before it (earlier turns included)."""
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:])


def predict_with_generate(model: Any, tokenizer: Any, template: Any, rows: Any,
                          cfg: LatheConfig) -> dict[str, float]:
    """Generate a reply for every row, score it, and write generated_predictions.jsonl."""
    from lathe.eval.metrics import generation_scores
    from lathe.infer import cut_at_stop, generate_replies, generation_one_at_a_time

    stop_ids = template.stop_token_ids(tokenizer)
    pairs = [split_row(row["input_ids"], row["labels"]) for row in rows]
    rank, world = _rank_and_world()
    mine = list(range(rank, len(pairs), world))
    why = generation_one_at_a_time(model)
    if why:
        log(f"Note: generating one row at a time: peft cannot generate a left-padded batch here ({why})")
    log(f"Predict: generating {len(pairs)} replies (batch {1 if why else cfg.train.per_device_eval_batch_size}, "
        f"max_new_tokens {cfg.generate.max_new_tokens}, "
        f"{'sampling' if cfg.generate.do_sample else 'greedy'})")
    was_training = model.training
    model.eval()  # no dropout while generating
    start = time.time()
    local = generate_replies(model, tokenizer, [pairs[i][0] for i in mine], cfg.generate, stop_ids,
                             batch_size=cfg.train.per_device_eval_batch_size,
                             progress=is_main_process())
    replies = _gather(mine, local, len(pairs), world)
    runtime = time.time() - start
    model.train(was_training)
    if replies is None:  # not rank 0
        return {}

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    predictions = [text(r) for r in replies]
    labels = [text(cut_at_stop(reply, stop_ids)) for _, reply in pairs]
    _write_predictions(Path(cfg.train.output_dir) / PREDICTIONS_FILE,
                       [tokenizer.decode(p, skip_special_tokens=False) for p, _ in pairs],
                       predictions, labels)
    scores = generation_scores(predictions, labels)
    metrics = {f"predict_{k}": float(v) for k, v in scores.items()}
    metrics.update(predict_samples=len(pairs), predict_runtime=round(runtime, 4),
                   predict_samples_per_second=round(len(pairs) / max(runtime, 1e-9), 3))
    log("Predict " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
        + f" on {len(pairs)} rows; replies in {Path(cfg.train.output_dir) / PREDICTIONS_FILE}")
    return metrics


def _write_predictions(path: Path, prompts: list[str], predictions: list[str],
                       labels: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prompt, predict, label in zip(prompts, predictions, labels):
            f.write(json.dumps({"prompt": prompt, "predict": predict, "label": label},
                               ensure_ascii=False) + "\n")


def _rows_with_prompt_masked(cfg: LatheConfig, tokenizer: Any, template: Any) -> Any:
    """With train_on_prompt the labels cannot tell prompt from reply: tokenize the eval
    set again with the prompt masked (cached like any tokenization)."""
    from dataclasses import replace

    from lathe.data.loader import load_stage_data

    data = load_stage_data("sft", replace(cfg.data, train_on_prompt=False), tokenizer, template,
                           seed=cfg.train.seed)
    return data.eval


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), 1


def _gather(mine: list[int], local: list[list[int]], n: int, world: int) -> list[list[int]] | None:
    """Every rank's replies, back in row order, on rank 0 (None elsewhere)."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(zip(mine, local)))
    if not is_main_process():
        return None
    replies: list[list[int]] = [[] for _ in range(n)]
    for part in parts:
        for i, reply in part:
            replies[i] = reply
    return replies
