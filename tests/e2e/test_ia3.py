"""finetuning_type: ia3, the first method added through the registry: trains, reloads with
plain peft, exports merged and verified, and is dpo's policy with the adapter as reference."""

from __future__ import annotations

import json

import pytest
import torch

import lathe
from tests.conftest import run_cli, write_pref_pairs

pytestmark = pytest.mark.slow


@pytest.fixture()
def args(tiny_model, data_dir, tmp_path) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 16, "per_device_train_batch_size": 8,
            "learning_rate": 5e-2, "max_steps": 8, "logging_steps": 1, "save_steps": 1000,
            "output_dir": str(tmp_path / "run"), "seed": 0, "finetuning_type": "ia3"}


def test_ia3_trains_reloads_exports_and_serves_as_dpo_policy(args, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = lathe.train(args)
    losses = result.losses()
    assert losses[-1] < losses[0]
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n for n in trainable)
    assert {n.split(".")[-3] for n in trainable} == {"k_proj", "v_proj", "down_proj"}  # peft's Llama choice
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), args["output_dir"])
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, expected, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
        assert not torch.allclose(base, expected, atol=1e-4)

    out = tmp_path / "export"
    proc = run_cli("export", args["output_dir"], f"export_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "export_verification.json").read_text())["passed"]

    d = write_pref_pairs(tmp_path / "pref")
    dpo = lathe.train({**args, "stage": "dpo", "dataset": "pairs", "dataset_dir": str(d), "max_steps": 4,
                       "output_dir": str(tmp_path / "dpo")})
    margins = [h["rewards/margins"] for h in dpo.log_history if "rewards/margins" in h]
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > margins[0]


def test_ia3_refusals(args):
    from lathe.config.load import load_config
    from lathe.errors import ConfigError

    with pytest.raises(ConfigError, match="ia3_target applies only to finetuning_type: ia3"):
        load_config({**args, "finetuning_type": "lora", "ia3_target": "all"})
    with pytest.raises(ConfigError, match="lora_rank applies only to finetuning_type: lora"):
        load_config({**args, "lora_rank": 4})
    with pytest.raises(ConfigError, match="adalora with stage ppo is not in Lathe yet"):
        load_config({**args, "finetuning_type": "adalora", "stage": "ppo", "reward_model": "x"})
    with pytest.raises(ConfigError, match="needs finetuning_type: lora"):
        load_config({**args, "quantization_bit": 4})
