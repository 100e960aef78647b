"""`lathe demo`: teach the tiny embedded model who it is, and show before and after."""

from __future__ import annotations

import time
from pathlib import Path

from lathe.demo.build import DATA_DIR, ensure_demo_model

QUESTION = "Who are you?"

DEMO_CONFIG = {
    "model_name_or_path": "lathe:demo",
    "stage": "sft",
    "finetuning_type": "lora",
    "lora_rank": 32,
    "lora_alpha": 64,
    "lora_target": "all",
    "dataset": "identity",
    "dataset_dir": str(DATA_DIR),
    "template": "chatml",
    "cutoff_len": 256,
    "per_device_train_batch_size": 10,
    "learning_rate": 5e-3,
    "num_train_epochs": 60,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "logging_steps": 10,
    "save_steps": 100000,
    "plot_loss": True,
    "seed": 42,
}


def run_demo(output_dir: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lathe.api import train
    from lathe.chat import chat_once
    from lathe.config.load import load_config
    from lathe.data.templates import get_template
    from lathe.export import run_export
    from lathe.infer import answer

    output_dir = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    base = ensure_demo_model()
    template = get_template(DEMO_CONFIG["template"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    before = answer(model, tokenizer, template, QUESTION, max_new_tokens=32)
    print(f"\nBefore fine-tuning, {QUESTION!r} -> {before!r}\n", flush=True)

    started = time.time()
    result = train({**DEMO_CONFIG, "output_dir": output_dir})
    after = answer(_reload(result.output_dir, base), tokenizer, template, QUESTION)
    out = Path(result.output_dir)

    # ship it: merge the adapter into a standalone model (verified), then ask the export
    export_dir = out.with_name(out.name + "-export")
    run_export(load_config({"model_name_or_path": str(base), "adapter_name_or_path": str(out),
                            "export_dir": str(export_dir)}, command="export"))
    exported = chat_once({"model_name_or_path": str(export_dir), "do_sample": False,
                          "max_new_tokens": 64}, QUESTION)
    print(
        f"\nBefore fine-tuning: {before!r}"
        f"\nAfter fine-tuning:  {after!r}"
        f"\nTrained in {time.time() - started:.0f} s; training loss {result.losses()[0]:.3f} -> "
        f"{result.losses()[-1]:.3f}"
        f"\nAdapter:   {out}/adapter_model.safetensors"
        f"\nLoss plot: {out}/training_loss.png"
        f"\nExported:  {export_dir} (verified: {export_dir}/export_verification.json)"
        f"\nThe export, asked {QUESTION!r} by `lathe chat`: {exported!r}"
        f"\nChat:      {lathe_command()} chat {export_dir}"
        f"\nRepeat:    {lathe_command()} train {out}/config.yaml",
        flush=True,
    )
    return out


def lathe_command() -> str:
    """How to call lathe from the user's shell, as printed hints should: `lathe` when that
    is on PATH, else the path of the lathe that is running (e.g. .venv/bin/lathe)."""
    import os
    import shutil
    import sys

    here = Path(sys.executable).parent / "lathe"
    found = shutil.which("lathe")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "lathe"
    if here.exists():
        rel = os.path.relpath(here)
        return rel if not rel.startswith("..") else str(here)
    return f"{sys.executable} -m lathe"


def _reload(output_dir: str, base: Path):
    """Load the saved adapter the way a user would: plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output_dir).eval()
