"""`lathe export cfg.yaml`: a verified merged model, or one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_yaml


@pytest.fixture(scope="module")
def adapter(tiny_model, data_dir, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 2 steps with template chatml."""
    import lathe

    out = tmp_path_factory.mktemp("adapter") / "run"
    lathe.train({"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
                 "template": "chatml", "cutoff_len": 128, "max_samples": 16, "per_device_train_batch_size": 8,
                 "learning_rate": 5e-3, "max_steps": 2, "save_steps": 1000, "output_dir": str(out),
                 "seed": 0, "report_to": "none"})
    return out


def _export(tmp_path: Path, args: dict):
    return run_cli("export", str(write_yaml(tmp_path / "export.yaml", args)))


def _fails(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("ConfigError:", "ModelError:", "OutputError:")), proc.stderr[-2000:]
    return last


def test_export_writes_a_verified_model(tiny_model, adapter, tmp_path):
    out = tmp_path / "exports" / "model"  # its parent does not exist yet
    proc = _export(tmp_path, {"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(adapter),
                              "export_dir": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Template: chatml (from {adapter}/config.yaml" in proc.stdout
    assert "Verification passed" in proc.stdout and "max |export - (base + adapters unmerged)|" in proc.stdout
    report = json.loads((out / "export_verification.json").read_text())
    assert report["passed"] and report["template"] == "chatml" and report["max_abs_logit_diff"] < report["bound"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # the temp folder was renamed, nothing else


def test_a_used_export_dir_is_refused_at_once(tiny_model, adapter, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "weights.bin").write_text("someone else's")
    msg = _fails(_export(tmp_path, {"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(adapter),
                                    "export_dir": str(out)}))
    assert msg.startswith("OutputError:") and "already holds files (weights.bin" in msg
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.yaml", "used"]


def test_a_missing_adapter_folder(tiny_model, tmp_path):
    msg = _fails(_export(tmp_path, {"model_name_or_path": str(tiny_model), "template": "chatml",
                                    "adapter_name_or_path": str(tmp_path / "no-adapter"),
                                    "export_dir": str(tmp_path / "out")}))
    assert msg.startswith("ModelError:") and "no-adapter does not exist" in msg
    assert not (tmp_path / "out").exists()


def test_an_adapter_trained_on_another_base_names_the_tensor(adapter, tmp_path):
    from lathe.demo.build import TinySpec, build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", TinySpec(vocab_size=512, hidden_size=48, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          num_key_value_heads=1, max_position_embeddings=256))
    msg = _fails(_export(tmp_path, {"model_name_or_path": str(wider), "adapter_name_or_path": str(adapter),
                                    "export_dir": str(tmp_path / "out")}))
    assert msg.startswith("ModelError:") and "does not fit base model" in msg
    assert "lora_A" in msg and "[8, 32] in the adapter but [8, 48] in the model" in msg
    assert not (tmp_path / "out").exists()


def test_lora_variants_train_reload_and_export_verified(tiny_model, data_dir, tmp_path):
    """DoRA + rsLoRA + a fully trained embedding beside the adapter: the run dir reloads with
    plain peft to the logits training left, and the export merges it and passes verification."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lathe

    run = tmp_path / "dora"
    result = lathe.train({"model_name_or_path": str(tiny_model), "dataset": "identity",
                          "dataset_dir": str(data_dir), "template": "chatml", "cutoff_len": 64,
                          "max_samples": 16, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                          "max_steps": 3, "save_steps": 1000, "output_dir": str(run), "seed": 0,
                          "use_dora": True, "use_rslora": True, "additional_target": "embed_tokens"})
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and config["modules_to_save"] == ["embed_tokens"]
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run).eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
        assert not torch.allclose(base, expected, atol=1e-4)  # the adapter changed something
    proc = run_cli("export", str(run), f"export_dir={tmp_path / 'exported'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "exported" / "export_verification.json").read_text())["passed"]
