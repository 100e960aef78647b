"""dpo: 1 pair x 4 accumulation steps gives the first-step gradient of 4 pairs x 1.

The loss is a mean over pairs; the Trainer divides it by the accumulation steps only
if it believes the loss is not already normalised (`loss_is_scaled_for_ga`). A wrong
guess would make the accumulated gradient 4x too large or too small.
"""

from __future__ import annotations

import json

import pytest
import torch


def _pairs() -> list[dict]:
    replies = [("Yes, gladly. It is good.", "No."), ("Sure, here it is.", "Go away now, please."),
               ("I like it a lot.", "Not today."), ("It is very nice indeed.", "Bad.")]
    return [{"instruction": f"Tell me about thing {i}.", "input": "", "chosen": c, "rejected": r}
            for i, (c, r) in enumerate(replies)]


def _first_step_grads(cfg_dict: dict) -> dict[str, torch.Tensor]:
    from transformers import TrainerCallback

    from lathe.config.load import load_config
    from lathe.recipes import dpo

    grads: dict[str, torch.Tensor] = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if not grads:
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        grads[name] = p.grad.detach().clone()

    setup = dpo.build(load_config(cfg_dict))
    setup.trainer.add_callback(Grab())
    setup.trainer.train()
    return grads


def _base(tiny_model, tmp_path, pref_loss: str) -> dict:
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.json").write_text(json.dumps(_pairs()))
    info = {"pairs": {"file_name": "pairs.json", "ranking": True}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    base = {"stage": "dpo", "pref_loss": pref_loss, "pref_ftx": 0.5,
            "model_name_or_path": str(tiny_model), "dataset": "pairs",
            "dataset_dir": str(data), "template": "chatml", "cutoff_len": 64, "lora_target": "all",
            "lora_dropout": 0.0, "learning_rate": 1e-3, "max_steps": 1, "max_grad_norm": 0.0,
            "logging_steps": 1, "save_steps": 1000, "seed": 0}
    return base


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a and a.keys() == b.keys()
    norm = torch.cat([g.flatten() for g in a.values()]).norm()
    assert norm > 0
    return float(torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / norm)


@pytest.mark.parametrize("pref_loss,split", [("sigmoid", True), ("simpo", True), ("sigmoid", False)])
def test_accumulated_gradient_equals_the_big_batch_gradient(tiny_model, tmp_path, pref_loss, split):
    base = {**_base(tiny_model, tmp_path, pref_loss), "pref_split_backward": split}
    big = _first_step_grads({**base, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                             "output_dir": str(tmp_path / "big")})
    acc = _first_step_grads({**base, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                             "output_dir": str(tmp_path / "acc")})
    diff = _relative_difference(big, acc)
    assert diff < 1e-4, f"relative gradient difference {diff:.2e}"


@pytest.mark.parametrize("pref_loss", ["sigmoid", "orpo"])
def test_split_backward_gives_the_joint_gradient(tiny_model, tmp_path, pref_loss):
    """Chosen and rejected pushed back one after the other = one joint pass."""
    base = {**_base(tiny_model, tmp_path, pref_loss), "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2}
    joint = _first_step_grads({**base, "pref_split_backward": False, "output_dir": str(tmp_path / "joint")})
    split = _first_step_grads({**base, "pref_split_backward": True, "output_dir": str(tmp_path / "split")})
    diff = _relative_difference(joint, split)
    assert diff < 1e-5, f"relative gradient difference {diff:.2e}"


def test_rng_replay_repeats_the_dropout_masks_then_carries_on():
    from lathe.recipes.trainers import _RngReplay

    torch.manual_seed(0)
    rng = _RngReplay("cpu")
    with rng.record():
        first = torch.rand(5)
    later = torch.rand(5)
    with rng.replay():
        again = torch.rand(5)
    after = torch.rand(5)
    torch.manual_seed(0)
    torch.rand(5), torch.rand(5)
    expected_after = torch.rand(5)
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert torch.equal(after, expected_after)
