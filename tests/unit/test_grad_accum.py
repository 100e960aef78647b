"""Gradient accumulation equals one large batch, for every stage's real trainer.

Each case builds the model, TrainingArguments and Trainer the way its recipe does
(lathe's own pieces, not a re-implementation), runs ONE optimizer step on the same
examples of different lengths, once as a single batch and once as micro-batches, and
captures the gradients just before the optimizer step. Token-level losses (pt, sft,
tagging, seq2seq) must be normalised over the trained tokens of the whole accumulated batch
(transformers' num_items_in_batch); rm over the pairs of the whole batch.

To add a stage: write a `_<stage>_case` returning a Case and add it to CASES.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lathe.config import load_config
from lathe.recipes.common import build_training_args

LENGTHS = (5, 11, 19, 30)  # deliberately different: a per-micro-batch mean would weigh them wrongly


@dataclass
class Case:
    rows: list[dict[str, list[int]]]  # tokenized examples, in the shape the stage's data layer makes
    build: Callable[[Any, Any], tuple[Any, Callable[[Any, Any], Any]]]  # (cfg, tokenizer) -> model, trainer(args, ds)
    model: str = "tiny_model"  # the fixture of the model it trains
    args: dict[str, Any] | None = None  # "args_class": "seq2seq" for Seq2SeqTrainingArguments, as the recipe


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def _lm_build(cfg, tokenizer):
    from lathe.model.adapters import apply_finetuning
    from lathe.model.load import load_model
    from lathe.recipes.common import lm_trainer

    model = apply_finetuning(load_model(cfg, cfg.model.model_name_or_path, tokenizer), cfg.finetune, cfg.model)
    return model, lambda args, ds: lm_trainer(model, args, tokenizer, ds)


def _sft_case(rng: random.Random) -> Case:
    rows = []
    for n in LENGTHS:  # a prompt (not trained) and a reply of different sizes
        ids, prompt = _ids(rng, n), max(1, n // 3)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "attention_mask": [1] * n})
    return Case(rows, _lm_build)


def _pt_case(rng: random.Random) -> Case:
    rows = []
    for n in LENGTHS:  # pt blocks: every token trained
        ids = _ids(rng, n)
        rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * n})
    return Case(rows, _lm_build)


def _rm_case(rng: random.Random) -> Case:
    from lathe.recipes import rm

    rows = []
    for n in LENGTHS:
        prompt, chosen, rejected = _ids(rng, n), _ids(rng, 3 + n % 4), _ids(rng, 2 + n % 7)
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * n + chosen,
                     "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * n + rejected})

    def build(cfg, tokenizer):
        model, _ = rm.build_model(cfg, cfg.model.model_name_or_path, tokenizer)
        return model, lambda args, ds: rm.build_trainer(model, args, tokenizer, ds)

    return Case(rows, build)


def _tagging_case(rng: random.Random) -> Case:
    from lathe.model.load import classifier_head
    from lathe.recipes import tagging
    from lathe.recipes.heads import build_task_model

    rows = []
    for n in LENGTHS:  # tags on some tokens only (later word pieces and specials are -100)
        labels = [rng.randrange(3) if k % 3 else -100 for k in range(n)]
        rows.append({"input_ids": [rng.randrange(10, 60) for _ in range(n)], "labels": labels,
                     "attention_mask": [1] * n, "word_ids": [None] * n})

    def build(cfg, tokenizer):
        model = build_task_model(cfg, cfg.model.model_name_or_path, tokenizer, "token_cls",
                                 classifier_head("token_classification", ("O", "B", "I")))
        return model, lambda args, ds: tagging.build_trainer(model, args, tokenizer, ds, None, None)

    return Case(rows, build, "tiny_bert_exact")


def _seq2seq_case(rng: random.Random) -> Case:
    from lathe.recipes import seq2seq
    from lathe.recipes.heads import build_task_model

    rows = []
    for n in LENGTHS:  # targets of different lengths (the model makes the decoder inputs)
        rows.append({"input_ids": [rng.randrange(10, 60) for _ in range(n)],
                     "labels": [rng.randrange(10, 60) for _ in range(2 + n // 2)]})

    def build(cfg, tokenizer):
        model = build_task_model(cfg, cfg.model.model_name_or_path, tokenizer, "seq2seq", {})
        return model, lambda args, ds: seq2seq.build_trainer(model, args, tokenizer, ds, None)

    return Case(rows, build, "tiny_t5", {"args_class": "seq2seq"})


CASES: dict[str, Callable[[random.Random], Case]] = {"sft": _sft_case, "pt": _pt_case, "rm": _rm_case,
                                                     "tagging": _tagging_case, "seq2seq": _seq2seq_case}


def first_step_grads(stage: str, case: Case, tiny_model, tmp_path, n_rows: int, batch: int, accum: int,
                     finetuning_type: str = "full") -> dict[str, torch.Tensor]:
    """Gradients of the first optimizer step, as the stage's Trainer accumulates them."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from lathe.model.load import fix_pad_token, load_tokenizer

    cfg = load_config({
        "model_name_or_path": str(tiny_model), "stage": stage, "finetuning_type": finetuning_type,
        "dataset": "unused", "output_dir": str(tmp_path / f"{stage}-{finetuning_type}-{batch}x{accum}"),
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum, "max_steps": 1,
        "max_grad_norm": 0, "logging_steps": 1, "save_strategy": "no", "seed": 0,
    })
    tokenizer = load_tokenizer(cfg.model, str(tiny_model))
    fix_pad_token(tokenizer)
    torch.manual_seed(0)  # new heads and adapters start the same in both runs
    model, make_trainer = case.build(cfg, tokenizer)
    extra = {}
    if case.args and case.args.get("args_class") == "seq2seq":
        from transformers import Seq2SeqTrainingArguments

        extra["args_class"] = Seq2SeqTrainingArguments
    trainer = make_trainer(build_training_args(cfg, has_eval=False, **extra), Dataset.from_list(case.rows[:n_rows]))

    class Grab(TrainerCallback):
        grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            Grab.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}

    trainer.add_callback(Grab())
    trainer.train()
    assert Grab.grads, "no gradient was captured"
    return Grab.grads


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(g.abs().sum() > 0 for g in a.values()), "all gradients are zero: the test proves nothing"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("stage", sorted(CASES))
def test_accumulated_micro_batches_equal_one_batch(stage, tmp_path, request):
    case = CASES[stage](random.Random(0))
    model = request.getfixturevalue(case.model)
    one_batch = first_step_grads(stage, case, model, tmp_path, 4, batch=4, accum=1)
    accumulated = first_step_grads(stage, case, model, tmp_path, 4, batch=1, accum=4)
    assert_same_grads(one_batch, accumulated)


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_short_last_micro_batch_weighs_its_share(stage, tmp_path, request):
    """3 examples as micro-batches of 2 and 1: a mean of micro-batch means would count the
    lone example twice as much as the others."""
    case = CASES[stage](random.Random(1))
    model = request.getfixturevalue(case.model)
    one_batch = first_step_grads(stage, case, model, tmp_path, 3, batch=3, accum=1)
    accumulated = first_step_grads(stage, case, model, tmp_path, 3, batch=2, accum=2)
    assert_same_grads(one_batch, accumulated)


def test_lora_models_get_the_same_normalisation(tiny_model, tmp_path):
    """A peft-wrapped model must still receive num_items_in_batch (else the Trainer would
    fall back to a mean per micro-batch)."""
    case = _sft_case(random.Random(2))
    one_batch = first_step_grads("sft", case, tiny_model, tmp_path, 4, batch=4, accum=1, finetuning_type="lora")
    accumulated = first_step_grads("sft", case, tiny_model, tmp_path, 4, batch=1, accum=4, finetuning_type="lora")
    assert_same_grads(one_batch, accumulated)


def test_the_check_can_fail(tiny_model, tmp_path):
    """Control: averaging per-example mean losses (what a naive accumulation does) gives a
    gradient these tolerances reject, so the equalities above mean something."""
    from lathe.model.load import load_model, load_tokenizer

    case = _pt_case(random.Random(0))
    reference = first_step_grads("pt", case, tiny_model, tmp_path, 4, batch=4, accum=1)
    cfg = load_config({"model_name_or_path": str(tiny_model), "dataset": "unused", "output_dir": "x",
                       "finetuning_type": "full"})
    model = load_model(cfg, str(tiny_model), load_tokenizer(cfg.model, str(tiny_model)))
    for row in case.rows:
        batch = {k: torch.tensor([v]) for k, v in row.items()}
        (model(**batch).loss / len(case.rows)).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(AssertionError):
        assert_same_grads(reference, naive)
