"""QLoRA's base-weight memory: the same ~30M-parameter Llama loaded in float32, 8-bit and 4-bit.

    python benchmarks/qlora_bench.py             # writes benchmarks/results/local/qlora.json
    python benchmarks/qlora_bench.py --record    # replaces the recorded results/qlora.json

The model is stages_bench.py's (hidden 512, 8 layers, vocab 2048, fp32), loaded the way
`lathe train ... quantization_bit=N` loads it (`lathe.model.load.load_model`), each in a
fresh process. Reported per precision: the weights' bytes (`get_memory_footprint`), the
ratio to float32, the process's peak resident memory above its size once the libraries are
imported, and the loss after 5 LoRA steps on the same batch (it must fall in every mode).
Target of the QLoRA issue: 4-bit base weights <= 0.35x the float32 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_dir: str, bits: int | None) -> dict:
    import torch

    from lathe.config.load import load_config
    from lathe.model.adapters import apply_finetuning
    from lathe.model.load import load_model, load_tokenizer

    keys = {"model_name_or_path": model_dir, "dataset": "x", "output_dir": "x", "lora_rank": 16}
    if bits:
        keys["quantization_bit"] = bits
    cfg = load_config(keys)
    tok = load_tokenizer(cfg.model, model_dir)
    baseline = _peak_mb()
    model = load_model(cfg, model_dir, tok)
    weights = model.get_memory_footprint()
    model = apply_finetuning(model, cfg.finetune, cfg.model)
    torch.manual_seed(0)
    ids = torch.randint(3, 2000, (4, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    return {"weights_mb": round(weights / 2**20, 2), "peak_above_baseline_mb": round(_peak_mb() - baseline, 1),
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(ap, "qlora")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bits = None if args.child[1] == "none" else int(args.child[1])
        print(json.dumps(child(args.child[0], bits)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from stages_bench import build_assets

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="lathe-qlora-bench-"))
    model_dir = build_assets(root)["model"]
    runs = {}
    for bits in ("none", "8", "4"):
        out = subprocess.run([sys.executable, __file__, "--child", model_dir, bits], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        runs["float32" if bits == "none" else f"{bits}-bit"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(bits, runs[list(runs)[-1]], flush=True)
    fp32 = runs["float32"]["weights_mb"]
    for r in runs.values():
        r["weights_ratio_to_float32"] = round(r["weights_mb"] / fp32, 3)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python benchmarks/qlora_bench.py", "model": "Llama hidden 512, 8 layers, vocab 2048",
              "runs": runs}
    out = output_path(args, "qlora")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
