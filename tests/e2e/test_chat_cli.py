"""`lathe chat` on the real command line, with messages piped in."""

from __future__ import annotations

import json

import pytest

from tests.conftest import IDENTITY, run_cli, write_yaml

MESSAGES = "Who are you?\n/clear\nWhat is your name?\n/exit\nThis line is never answered\n"


def _train(tiny_model, data_dir, out, **args) -> str:
    import lathe

    base = {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "logging_steps": 100, "save_steps": 1000,
            "output_dir": str(out), "seed": 0, "report_to": "none"}
    return lathe.train({**base, **args}).output_dir


@pytest.fixture(scope="module")
def adapter(tiny_model, data_dir, tmp_path_factory) -> str:
    """A LoRA adapter trained 2 steps."""
    return _train(tiny_model, data_dir, tmp_path_factory.mktemp("chat") / "lora", max_steps=2,
                  max_samples=8, per_device_train_batch_size=4)


def _replies(stdout: str) -> list[str]:
    return [line[len("Assistant: "):] for line in stdout.splitlines() if line.startswith("Assistant: ")]


def test_chat_with_an_adapter_answers_each_message_until_exit(tiny_model, adapter, tmp_path):
    from lathe.chat import chat_once

    args = {"model_name_or_path": str(tiny_model), "adapter_name_or_path": adapter, "template": "chatml",
            "do_sample": False, "max_new_tokens": 8}
    proc = run_cli("chat", str(write_yaml(tmp_path / "chat.yaml", args)), "--system", "Be brief.",
                   cwd=tmp_path, input=MESSAGES)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = _replies(proc.stdout)
    assert len(replies) == 2
    # the CLI's streamed line is the greedy answer to the same prompt (system prompt included)
    assert replies[0] == chat_once(args, "Who are you?", system="Be brief.")
    assert "History cleared." in proc.stderr
    assert "User:" not in proc.stdout and "Traceback" not in proc.stderr


def test_chat_with_a_plain_model_folder_answers_what_it_learned(tiny_model, data_dir, tmp_path):
    """A full fine-tuning run is a plain model folder (no adapters); its config.yaml gives the template."""
    run = _train(tiny_model, data_dir, tmp_path / "full", finetuning_type="full", max_steps=12,
                 max_samples=4, per_device_train_batch_size=4, learning_rate=2e-2,
                 lr_scheduler_type="constant")
    trained = json.loads(IDENTITY.read_text(encoding="utf-8"))[0]
    assert trained["instruction"] == "Who are you?"
    cfg = write_yaml(tmp_path / "chat.yaml", {"model_name_or_path": run, "do_sample": False})
    proc = run_cli("chat", str(cfg), cwd=tmp_path, input=MESSAGES)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = _replies(proc.stdout)
    assert len(replies) == 2
    assert replies[0] == trained["output"]  # exactly the trained reply: it stopped at <|im_end|>
    assert "Template: chatml (from" in proc.stderr


@pytest.mark.parametrize("args, expected", [
    ({"template": "chatml"}, "ConfigError: model_name_or_path is missing"),
    ({"model_name_or_path": "no/such-model-here"}, "no/such-model-here"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, args, expected):
    proc = run_cli("chat", str(write_yaml(tmp_path / "bad.yaml", args)), cwd=tmp_path, input="Hi\n")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert proc.stdout == ""
