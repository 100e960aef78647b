"""Direct preference optimisation (pref_loss sigmoid | hinge | ipo | orpo | simpo).

tokenizer -> preference pairs -> policy (+ reference) -> trainer -> save. Chosen and
rejected replies go through one forward pass (one right-padded batch: chosen rows,
then rejected rows); orpo and simpo need no reference, so none is loaded or run.
"""

from __future__ import annotations

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
    install_callbacks(trainer, cfg.train.output_dir, perplexity=False)
    return Setup(trainer, data, tokenizer, template.stop_token_ids(tokenizer), resume_from)


def _reference_note(cfg: LatheConfig, use_reference: bool, ref_model: Any) -> str:
    a = cfg.align
    if not use_reference:
        ref = "none (reference-free)"
    elif ref_model is not None:
        ref = f"a frozen copy of {a.ref_model or 'the starting model'}"
    elif cfg.model.adapter_name_or_path:
        ref = "the continued adapter, frozen as 'ref'"
    else:
        ref = "the base model (adapter disabled)"
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
            a = self.align
            total, count = self.logps(model, inputs)
            n = total.shape[0] // 2
            chosen, rejected = (total[:n], count[:n]), (total[n:], count[n:])
            ref_chosen = ref_rejected = None
            if self.use_reference:
                ref_total, ref_count = self.reference_logps(model, inputs)
                ref_chosen, ref_rejected = (ref_total[:n], ref_count[:n]), (ref_total[n:], ref_count[n:])
            out = preference_loss(a.pref_loss, chosen, rejected, ref_chosen, ref_rejected,
                                  beta=a.pref_beta, label_smoothing=a.pref_label_smoothing,
                                  simpo_gamma=a.simpo_gamma)
            losses = out.losses
            if a.pref_ftx > 0:
                sft = -average_logps(*chosen)
                losses = losses + a.pref_ftx * sft
                self.record(model, "sft_loss", sft.detach().sum().item(), n)
            self._record_pairs(model, out, chosen[0].detach(), rejected[0].detach(), n)
            loss = losses.mean()
            return (loss, None) if return_outputs else loss

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
