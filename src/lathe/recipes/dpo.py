"""Direct preference optimisation (pref_loss sigmoid | hinge | ipo | orpo | simpo).

tokenizer -> preference pairs -> policy (+ reference) -> trainer -> save. A batch is
one right-padded block (chosen rows, then rejected rows). By default the two halves go
forward and backward one after the other (`pref_split_backward`, see `training_step`),
so DPO holds the activations of one side only; orpo and simpo need no reference, so
none is loaded or run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.loader import load_stage_data
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.model.load import fix_pad_token, load_tokenizer, resolve_model_path
from lathe.recipes.common import (
    RunResult,
    check_output_dir,
    install_callbacks,
    open_run,
    print_summary,
    read_rows,
)
from lathe.recipes.losses import REFERENCE_FREE, average_logps, preference_loss
from lathe.recipes.preference import (
    Setup,
    load_policy_and_reference,
    make_trainer_class,
    pad_rows,
    train_and_save,
)

STAGE = "dpo"


def run(cfg: LatheConfig) -> RunResult:
    return train_and_save(build(cfg), cfg)


def build(cfg: LatheConfig) -> Setup:
    """Everything up to a ready trainer (tests inspect it before training)."""
    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    conversations = read_rows(cfg)  # bad rows (e.g. sft data, no ranking: true) before slow imports

    from transformers import set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model, model_path)
    notes = [n for n in [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer)] if n]
    data = load_stage_data(STAGE, cfg.data, tokenizer, template, seed=cfg.train.seed,
                           conversations=conversations)
    example = next(iter(data.train))

    use_reference = cfg.align.pref_loss not in REFERENCE_FREE
    model, ref_model = load_policy_and_reference(cfg, model_path, tokenizer, use_reference)
    notes.append(_reference_note(cfg, use_reference, ref_model))

    args = open_run(cfg, has_eval=data.eval is not None, resuming=resume_from is not None)
    shown = mark_trained(example["chosen_input_ids"], example["chosen_labels"], tokenizer, color=False)
    print_summary(cfg, model, model_path, data, shown, notes,
                  example_caption="a chosen reply, trained tokens marked")

    trainer = make_dpo_trainer_class()(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, data_collator=PairCollator(tokenizer.pad_token_id),
        ref_model=ref_model, use_reference=use_reference, align=cfg.align,
    )
    install_callbacks(trainer, cfg, perplexity=False)
    return Setup(trainer, data, tokenizer, template.stop_token_ids(tokenizer), resume_from)


def _reference_note(cfg: LatheConfig, use_reference: bool, ref_model: Any) -> str:
    a = cfg.align
    if not use_reference:
        ref = "none (reference-free)"
    elif ref_model is not None:
        ref = f"a frozen copy of {a.ref_model or 'the starting model'}"
    elif cfg.model.adapter_name_or_path and not cfg.finetune.create_new_adapter:
        ref = "the continued adapter, frozen as 'ref'"
    else:
        merged = " with the given adapters merged" if cfg.model.adapter_name_or_path else ""
        ref = f"the base model{merged} (adapter disabled)"
    return f"pref_loss {a.pref_loss}, beta {a.pref_beta}, pref_ftx {a.pref_ftx}; reference: {ref}"


class PairCollator:
    """Pairs -> one batch: chosen rows first, then rejected rows, right-padded together."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rows += [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        return pad_rows(rows, self.pad_id)


def make_dpo_trainer_class() -> type:
    base = make_trainer_class()

    class DPOTrainer(base):
        def __init__(self, *args: Any, align: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.align = align

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """Mean over pairs (+ pref_ftx x mean NLL per chosen token), metrics recorded."""
            total, count = self.logps(model, inputs)
            n = total.shape[0] // 2
            refs = self._reference_halves(model, inputs, n)
            loss = self.pair_loss(model, (total[:n], count[:n]), (total[n:], count[n:]), *refs)
            return (loss, None) if return_outputs else loss

        def pair_loss(self, model: Any, chosen: tuple[Any, Any], rejected: tuple[Any, Any],
                      ref_chosen: Any, ref_rejected: Any) -> Any:
            """The loss from per-row (summed log-prob, token count); records the metrics."""
            a = self.align
            n = chosen[0].shape[0]
            out = preference_loss(a.pref_loss, chosen, rejected, ref_chosen, ref_rejected,
                                  beta=a.pref_beta, label_smoothing=a.pref_label_smoothing,
                                  simpo_gamma=a.simpo_gamma)
            losses = out.losses
            if a.pref_ftx > 0:
                sft = -average_logps(*chosen)
                losses = losses + a.pref_ftx * sft
                self.record(model, "sft_loss", sft.detach().sum().item(), n)
            self._record_pairs(model, out, chosen[0].detach(), rejected[0].detach(), n)
            return losses.mean()

        def _reference_halves(self, model: Any, inputs: dict[str, Any], n: int) -> tuple[Any, Any]:
            if not self.use_reference:
                return None, None
            total, count = self.reference_logps(model, inputs)
            return (total[:n], count[:n]), (total[n:], count[n:])

        # -- split backward: activations of one side at a time
        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            """With pref_split_backward, chosen and rejected rows go forward and backward
            one after the other instead of in one joint batch.

            The loss depends on the policy only through each row's summed log-prob, so
            its gradient is sum_i dL/dlogp_i * grad(logp_i): the coefficients dL/dlogp_i
            come from a first, gradient-free pass over the rejected rows, then each side
            is pushed back with its coefficients. Peak activation memory is that of one
            side (what SFT on the chosen replies costs), for one extra forward pass.
            Dropout masks of the rejected rows are replayed so both passes agree.
            """
            if not self._can_split():
                return super().training_step(model, inputs, num_items_in_batch)
            import torch

            model.train()
            if callable(getattr(self.optimizer, "train", None)):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            n = inputs["input_ids"].shape[0] // 2
            chosen_rows = {k: v[:n] for k, v in inputs.items()}
            rejected_rows = {k: v[n:] for k, v in inputs.items()}
            scale = 1.0 / self.current_gradient_accumulation_steps
            rng = _RngReplay(self.args.device)
            with self.compute_loss_context_manager():
                refs = self._reference_halves(model, inputs, n)
                with torch.no_grad(), rng.record():
                    rejected_value = self.logps(model, rejected_rows)
                with self.accelerator.no_sync(model):  # the rejected pass below syncs both
                    chosen = self.logps(model, chosen_rows)
                    leaves = [chosen[0].detach().requires_grad_(), rejected_value[0].detach().requires_grad_()]
                    with torch.enable_grad():
                        loss = self.pair_loss(model, (leaves[0], chosen[1]), (leaves[1], rejected_value[1]),
                                              *refs) * scale
                    coef_chosen, coef_rejected = torch.autograd.grad(loss, leaves)
                    self.accelerator.backward((chosen[0] * coef_chosen).sum())
                    del chosen
                with rng.replay():
                    rejected = self.logps(model, rejected_rows)
            self.accelerator.backward((rejected[0] * coef_rejected).sum())
            return loss.detach()

        def _can_split(self) -> bool:
            """Only where two backward passes per micro-batch are safe (not DeepSpeed/FSDP)."""
            return (self.align.pref_split_backward and not self.is_deepspeed_enabled
                    and not self.is_fsdp_enabled and self.args.n_gpu <= 1
                    and not getattr(self.args, "parallelism_config", None))

        def _record_pairs(self, model: Any, out: Any, chosen_logps: Any, rejected_logps: Any,
                          n: int) -> None:
            margins = out.chosen_rewards - out.rejected_rewards
            for key, value in (("rewards/chosen", out.chosen_rewards),
                               ("rewards/rejected", out.rejected_rewards),
                               ("rewards/margins", margins),
                               ("rewards/accuracies", (margins > 0).float()),
                               ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
                self.record(model, key, value.float().sum().item(), n)

    return DPOTrainer


class _RngReplay:
    """Record the random state before a pass and replay it later (same dropout masks),
    then continue the stream where it would have been without the replay."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.start: Any = None

    def _get(self) -> Any:
        import torch

        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set(self, state: Any) -> None:
        import torch

        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.start = self._get()
        yield

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        after = self._get()
        self._set(self.start)
        try:
            yield
        finally:
            self._set(after)
