"""One model's memory and latency, measured in a fresh process.

    python -m lathe.quant.measure SPEC.json      -> the figures as one JSON line on stdout

A fresh process per model, so the peak memory of loading one is not hidden by another's and
every model starts from the same state; the peak is counted from just before loading (the
libraries already imported): `load_peak_mb` right after loading (a float checkpoint is
memory-mapped, so its weights are only read later), `peak_mb` after the first batch has run
(every weight read once): what the model costs in memory. Latency is warm (two
untimed runs first), the median of `repeats` timed runs: a forward pass over a batch of the eval rows for task models
(per example = the batch's time / its size), `new_tokens` greedy tokens for generating
models (per token = the time / new_tokens, every sequence of the batch advancing a token).
`cpu_ms` is the median CPU time of the same runs (every thread of the process): on a machine
other work shares, a model that waited for a core is slower by the clock but not by it.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Start the peak resident memory (VmHWM) afresh (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load(folder: str, task: str) -> Any:
    from lathe.model.load import auto_class
    from lathe.model.quant.store import is_quantized_dir, load_quantized

    if is_quantized_dir(folder):
        return load_quantized(folder, task)
    auto, _ = auto_class(task)
    return auto.from_pretrained(folder, dtype="auto").eval()


def _import_model_code(folder: str, task: str) -> None:
    from transformers import AutoConfig

    from lathe.model.load import auto_class

    auto, _ = auto_class(task)
    config = AutoConfig.from_pretrained(folder)
    auto._model_mapping[type(config)]  # imports the architecture's module
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401


def _batch(rows: list[list[int]], size: int, pad_id: int, left: bool) -> tuple[Any, Any]:
    import torch

    picked = [rows[i % len(rows)] for i in range(size)]
    width = max(len(r) for r in picked)
    ids = torch.full((size, width), pad_id, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, r in enumerate(picked):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    _import_model_code(spec["model"], spec["task"])  # what any model needs is held before the baseline
    _reset_peak()
    before = _rss_mb()
    start = time.perf_counter()
    model = load(spec["model"], spec["task"])
    result: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 3),
                              "load_peak_mb": round(_peak_mb() - before, 1),
                              "loaded_mb": round(_rss_mb() - before, 1), "latency": {}}
    generate, n_new = spec["generate"], int(spec.get("new_tokens", 16))
    pad = spec["pad_id"]
    for size in spec["batches"]:
        ids, mask = _batch(spec["inputs"], size, pad, left=generate and not spec.get("encoder_decoder"))
        if generate:
            def step(ids: Any = ids, mask: Any = mask) -> None:
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=False, pad_token_id=pad)
        else:
            def step(ids: Any = ids, mask: Any = mask) -> None:
                model(input_ids=ids, attention_mask=mask)
        times, cpu = [], []
        with torch.inference_mode():
            for _ in range(2):
                step()
            for _ in range(int(spec["repeats"])):
                t, c = time.perf_counter(), time.process_time()
                step()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        if "peak_mb" not in result:  # loaded and run once at the smallest batch: every weight was read
            result["peak_mb"] = round(_peak_mb() - before, 1)
        median, cpu_median = statistics.median(times), statistics.median(cpu)
        unit = n_new if generate else size
        result["latency"][str(size)] = {"ms": round(median * 1e3, 3), "ms_per_" + ("token" if generate else "example"):
                                        round(median / unit * 1e3, 4), "runs_ms": [round(t * 1e3, 3) for t in times],
                                        "cpu_ms": round(cpu_median * 1e3, 3)}
    return result


def main(argv: list[str] | None = None) -> int:
    from lathe.quiet import quiet_warnings, quiet_weight_loading

    quiet_warnings()
    quiet_weight_loading()
    path = (argv or sys.argv[1:])[0]
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    print(json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
