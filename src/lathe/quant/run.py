"""`lathe quantize`: a trained model (a run directory or an export) -> a quantized model folder
and a report that puts it beside the float model.

Readable top to bottom (`run_quantize`): refuse a used output_dir and a scheme this machine
cannot run -> load the float model (adapters merged) -> calibration rows when the scheme or
the sensitivity scan needs them -> the layers to quantize (minus quantization_skip_modules,
minus the most sensitive ones when quantization_keep_float is set) -> swap them -> save into
a temp folder, reload it and check it gives the outputs it gave before saving -> rename it to
output_dir -> measure float and quantized side by side (lathe.quant.report).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError, ModelError
from lathe.files import check_free_folder, publish_folder
from lathe.recipes.common import log

SCAN_FILE = "sensitivity.json"


def check_scheme_runs_here(scheme: Any, engines: list[str] | None = None) -> None:
    """int8 GEMMs need torch's fbgemm or x86 quantized engine (x86-64 builds have them);
    `engines`: the ones this torch build has (default: asked of torch)."""
    import torch

    if not scheme.engine:
        return
    engines = torch.backends.quantized.supported_engines if engines is None else engines
    engine = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if engine is None:
        raise ConfigError(f"quantization_scheme: {scheme.name} needs an int8 GEMM, and this torch build has no "
                          f"x86/fbgemm quantized engine (it has {', '.join(engines) or 'none'}); use "
                          "int8_weight_only or int4_weight_only, which run anywhere")
    torch.backends.quantized.engine = engine


def check_adapters_merge(cfg: LatheConfig) -> None:
    from lathe.model.methods import method_of_adapter

    for adapter in cfg.model.adapter_name_or_path or []:
        method = method_of_adapter(adapter)
        if method is not None and not method.can_merge:
            raise ModelError(f"{adapter} holds a {method.name} adapter, which adds virtual tokens instead of "
                             "changing weights, so there is no merged model to quantize; quantize the base model "
                             f"({cfg.model.model_name_or_path}) and load the adapter on it, or train with lora")


def run_quantize(cfg: LatheConfig, origin: str = "ptq") -> dict[str, Any]:
    """`origin`: ptq (a model trained in float) or qat (a quantization-aware training run)."""
    import torch

    from lathe.model.load import load_for_inference, resolve_model_path, stage_task
    from lathe.model.quant.convert import SCHEMES, candidates, skipped, swap

    q = cfg.quantize
    out = Path(cfg.train.output_dir).expanduser()
    check_free_folder(out, "output_dir")  # before anything slow
    scheme = SCHEMES[q.quantization_scheme]
    check_scheme_runs_here(scheme)
    resolve_model_path(cfg.model.model_name_or_path)
    check_adapters_merge(cfg)
    task = stage_task(cfg.finetune.stage)
    source = (cfg.model.adapter_name_or_path or [cfg.model.model_name_or_path])[-1]
    template = _template(cfg)

    log(f"Loading {source} (float, adapters merged)")
    model, tokenizer, _ = load_for_inference(cfg)
    model = model.float()

    needs_rows = scheme.calibrated or q.quantization_keep_float > 0
    batches = None
    if needs_rows:
        from lathe.quant.calibrate import calibration_batches

        batches = calibration_batches(cfg, tokenizer, template, model)
        log(f"Calibration: {q.calibration_samples} rows of {', '.join(q.calibration_dataset or [])}")
    names, cannot = candidates(model, scheme, q.quantize_embeddings, q.quantization_group_size)
    kept = skipped(names, q.quantization_skip_modules or [])
    for pattern in q.quantization_skip_modules or []:
        from lathe.model.quant.convert import matches

        if not any(matches(n, pattern) for n in names):
            raise ConfigError(f"quantization_skip_modules: {pattern} names no quantizable layer of this model; "
                              f"its layers are named like {', '.join(names[:3])} ...")
    names = [n for n in names if n not in kept]
    ranges = None
    if scheme.calibrated:
        from lathe.quant.calibrate import activation_ranges

        linear = [n for n in names if not isinstance(model.get_submodule(n), torch.nn.Embedding)]
        ranges = activation_ranges(model, linear, batches)
        unseen = [n for n in linear if n not in ranges]
        kept += unseen  # a layer no calibration row reached has no range: it stays float
        names = [n for n in names if n not in unseen]
    scan = None
    if q.quantization_keep_float > 0:
        from tqdm.auto import tqdm

        from lathe.quant.calibrate import most_sensitive, sensitivity_scan

        with tqdm(total=len(names), desc="Sensitivity scan", unit="layer", leave=False) as bar:
            scan = sensitivity_scan(model, names, scheme, batches, ranges, q.quantization_group_size, bar)
        sensitive = most_sensitive(scan, q.quantization_keep_float)
        kept += sensitive
        names = [n for n in names if n not in sensitive]
        log(f"Sensitivity scan: {len(scan)} layers; kept in float: {', '.join(sensitive)}")

    probe = batches[0] if batches else _probe(model, tokenizer, task)
    float_dir = None
    try:  # the float copy is measured by the report, then removed, whatever happens
        if q.quantize_report:  # the float model, measured beside the quantized one in a process of its own
            float_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=_parent(out)))
            _chat_template(model, tokenizer, template, task)
            model.save_pretrained(str(float_dir))
            tokenizer.save_pretrained(str(float_dir))
        layout = swap(model, names, scheme, ranges=ranges, group_size=q.quantization_group_size)
        before = _outputs(model, probe)
        info = {"scheme": scheme.name, "origin": origin, "summary": scheme.summary, "task": task,
                "source": str(source),
                "keys": recorded_keys(cfg),
                "float_layers": kept, "cannot_quantize": cannot, "torch": torch.__version__,
                "engine": torch.backends.quantized.engine if scheme.engine else None,
                **({"calibration": {"dataset": q.calibration_dataset, "samples": q.calibration_samples}}
                   if needs_rows else {})}

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.quantize-", dir=_parent(out)))
        try:
            from lathe.model.quant.store import load_quantized, save_quantized

            _chat_template(model, tokenizer, template, task)
            save_quantized(model, tokenizer, tmp, layout, info)
            if scan is not None:
                (tmp / SCAN_FILE).write_text(json.dumps(scan, indent=2) + "\n", encoding="utf-8")
            reloaded = _outputs(load_quantized(tmp, task), probe)
            diff = float((reloaded - before).abs().max())
            if diff > 1e-5:
                raise ModelError(f"the quantized model gives other outputs after saving and reloading (max difference "
                                 f"{diff:.3g}); this is a bug in Lathe: please report it (nothing was written)")
            publish_folder(tmp, out, "output_dir")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        n_layers = len(layout)
        log(f"Quantized {n_layers} layers ({scheme.name}); {len(kept)} kept in float -> {out}")
        result = {"output_dir": str(out), "scheme": scheme.name, "layers": n_layers, "float_layers": kept,
                  "reload_max_diff": diff}
        del model
        if float_dir is not None:
            from lathe.quant.report import build_report

            result["report"] = build_report(cfg, out, float_dir, tokenizer, template, task)
    finally:
        if float_dir is not None:
            shutil.rmtree(float_dir, ignore_errors=True)
    return result


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _template(cfg: LatheConfig) -> Any:
    from lathe.data.templates import get_template

    return get_template(cfg.data.template)


def recorded_keys(cfg: LatheConfig) -> dict[str, Any]:
    """The keys a quantized folder records for whoever loads it (lathe.runs.quantized_keys reads
    them): the stage, its template, and the task head's keys where the stage has them."""
    stage = cfg.finetune.stage
    keys = {"stage": stage, "template": cfg.data.template,
            "problem_type": cfg.task.problem_type if stage == "cls" else None,
            "label_names": list(cfg.task.label_names) if cfg.task.label_names else None,
            "pooling": cfg.task.pooling if stage == "embed" else None}
    return {k: v for k, v in keys.items() if v is not None}


def _chat_template(model: Any, tokenizer: Any, template: Any, task: str) -> None:
    """A language model's folder carries its trained template as the tokenizer's chat_template and
    its stop tokens in generation_config.json (as an export does)."""
    if task != "causal_lm":
        return
    from lathe.data.template_jinja import template_to_jinja
    from lathe.infer import set_stop_tokens

    tokenizer.chat_template = template_to_jinja(template, tokenizer)
    set_stop_tokens(model, template.stop_token_ids(tokenizer))


def _probe(model: Any, tokenizer: Any, task: str) -> dict[str, Any]:
    """A small batch of inputs for the reload check when no calibration rows were read."""
    import torch

    enc = tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello there!"], return_tensors="pt",
                    padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "seq2seq":
        batch["decoder_input_ids"] = torch.zeros((2, 1), dtype=torch.long) + (
            model.config.decoder_start_token_id or 0)
    return batch


def _outputs(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    from lathe.quant.calibrate import main_output

    with torch.inference_mode():
        return main_output(model(**batch))
