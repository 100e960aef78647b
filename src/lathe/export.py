"""`lathe export`: merge adapters into the base model, save it, and verify what was saved.

Readable top to bottom (`run_export`): refuse a used export_dir -> find the template the
model was trained with -> load base + adapters merged -> write weights (in export_dtype,
sharded), tokenizer (with the template as its Jinja chat_template) and
generation_config.json (the template's stop tokens as eos) into a temp folder next to
export_dir -> verify the temp folder with plain transformers -> rename it to export_dir
-> push to the hub if asked.

A failed verification still publishes the files (to inspect them) and writes
export_verification.json, but exits with a ModelError pointing at that file; nothing is
pushed then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.conversation import Conversation, Message
from lathe.data.template_jinja import template_to_jinja
from lathe.data.templates import Template, get_template
from lathe.errors import ConfigError, ModelError, OutputError
from lathe.files import check_free_folder, publish_folder
from lathe.infer import set_stop_tokens
from lathe.recipes.common import log
from lathe.runs import trained_template

__all__ = ["run_export", "template_to_jinja", "save_weights", "verify_export", "logit_bound"]

REPORT = "export_verification.json"
DTYPES = ("float32", "bfloat16", "float16")

# Largest |export - reference| logit difference accepted. The export merges W + BA into one
# weight, rounded once to the dtype; the reference computes W x and B A x apart. Both differ
# from exact maths by the dtype's rounding (unit roundoff: float32 6e-8, float16 4.9e-4,
# bfloat16 3.9e-3) grown through the layers. The bound is a fraction of the largest
# |reference logit| (at least 1): ~100x the roundoff in float32, ~10x in half precision
# (measured on tiny and 16-layer random Llamas: float32 ~1e-6, float16 ~2e-3 and bfloat16
# ~2e-2 of the largest logit). In half precision it is also at least twice the dtype's own
# noise on this model (the reference run in the dtype vs the same weights in float32), so a
# deep model whose half-precision inference is noisy anyway is not failed for it.
RELATIVE_BOUND = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}
NOISE_FACTOR = 2.0


# (system, turns): rendered with the template for the logit and chat_template checks.
VERIFY_CHATS: tuple[tuple[str | None, tuple[tuple[str, str], ...]], ...] = (
    (None, (("Who are you?", "I am a helpful assistant."),)),
    ("You are a concise assistant.", (("Name a colour.", "Blue."),)),
    (None, (("Hello!", "Hi! How can I help?"), ("Tell me a fact.", "Water boils at 100 C at sea level."))),
    ("Answer in one word.", (("Hi there", "Hello."), ("What is 2 + 2?", "Four."))),
)


def run_export(cfg: LatheConfig) -> dict[str, Any]:
    """Merge, save, verify; returns what was written (and the verification report)."""
    out = Path(cfg.export.export_dir).expanduser()
    check_export_dir(out)  # before anything slow: a used folder is refused at once
    from lathe.model.load import load_for_inference, resolve_model_path, stage_task

    resolve_model_path(cfg.model.model_name_or_path)  # a wrong path is reported before anything else
    lm = stage_task(cfg.finetune.stage) == "causal_lm"  # else a task model: no chat template, no stops
    template_name = resolve_template(cfg) if lm else cfg.data.template
    template = get_template(template_name)

    adapters = cfg.model.adapter_name_or_path or []
    merge = merges_last_adapter(cfg)
    log(f"Loading {cfg.model.model_name_or_path}" + (f" + {len(adapters)} adapter(s)" if adapters else "")
        + (", merged" if adapters and merge else ""))
    if adapters and not merge:
        log(f"The last adapter stays an adapter: the export is the base model with it in {ADAPTER_DIR}/ "
            "(load both, see LOADING.md)")
    model, tokenizer, base_path = load_for_inference(cfg, merge=True, merge_last=merge)
    dtype = export_dtype(cfg, base_path)
    chat_template = template_to_jinja(template, tokenizer) if lm else None
    stop_ids = template.stop_token_ids(tokenizer) if lm else []

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        files = save_export(model, tokenizer, tmp, dtype=dtype, max_shard_size=f"{cfg.export.export_size}GB",
                            legacy=cfg.export.export_legacy_format, chat_template=chat_template,
                            stop_ids=stop_ids, final_dir=out)
        if cfg.finetune.stage == "embed":  # loads with SentenceTransformer(export_dir) too
            from lathe.recipes.embed import write_sentence_transformers_files

            write_sentence_transformers_files(tmp, cfg.task.pooling if cfg.task.pooling != "auto" else "mean",
                                              cfg.data.cutoff_len, model.config)
        del model  # the verification loads the export and the reference one at a time
        report = None
        if cfg.export.export_verify:
            log("Verifying: reloading the export with plain transformers")
            report = verify_export(cfg, tmp, tokenizer, template, stop_ids, dtype, base_path)
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        else:
            log("Verification skipped (export_verify: false)")
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"Exported to {out} ({dtype}, {', '.join(files)})")
    if report is not None:
        print_report(report, out)
        if not report["passed"]:
            raise ModelError(f"export {out} failed verification: {report['problems'][0]}; the files are kept "
                             f"for inspection, details in {out / REPORT}")
    if cfg.export.export_hub_model_id:
        push_to_hub(out, cfg.export.export_hub_model_id)
    return {"export_dir": str(out), "template": template_name if lm else None, "dtype": dtype, "files": files,
            "eos_token_id": stop_ids, "verification": report}


# --- the export folder ---------------------------------------------------------------

def check_export_dir(out: Path) -> None:
    check_free_folder(out, "export_dir")


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to export_dir (an empty export_dir is replaced)."""
    publish_folder(tmp, out, "export_dir")


# --- what to export ------------------------------------------------------------------

def resolve_template(cfg: LatheConfig) -> str:
    """`template` when the user set it; else the one recorded in the trained run's config.yaml
    (the last adapter's folder, or model_name_or_path when it is a full fine-tuning run)."""
    run_dir, recorded = trained_template(cfg, cfg.model.model_name_or_path)
    if cfg.is_set("template"):
        if recorded and recorded != cfg.data.template:
            log(f"Note: {run_dir} was trained with template {recorded}, but template: {cfg.data.template} "
                "is exported as you asked")
        log(f"Template: {cfg.data.template}")
        return cfg.data.template
    if recorded:
        log(f"Template: {recorded} (from {run_dir}/config.yaml, the config it was trained with)")
        return recorded
    log(f"Template: {cfg.data.template} (the default: template is not set and {run_dir} holds no "
        "config.yaml; set template to the one the model was trained with)")
    return cfg.data.template


def export_dtype(cfg: LatheConfig, base_path: str) -> str:
    """export_dtype, or for auto the dtype the base checkpoint's config.json records (float32 if none)."""
    if cfg.export.export_dtype != "auto":
        return cfg.export.export_dtype
    from transformers import PreTrainedConfig

    try:
        raw, _ = PreTrainedConfig.get_config_dict(base_path, cache_dir=cfg.model.cache_dir,
                                                  revision=cfg.model.model_revision)
    except (OSError, ValueError):
        return "float32"
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


# --- saving --------------------------------------------------------------------------

def merges_last_adapter(cfg: LatheConfig) -> bool:
    """export_merge, or by default whether the last adapter's method can merge. Asking to merge
    one that cannot is a ConfigError."""
    from lathe.model.methods import method_of_adapter

    adapters = cfg.model.adapter_name_or_path or []
    method = method_of_adapter(adapters[-1]) if adapters else None
    can = method is None or method.can_merge
    if cfg.export.export_merge and not can:
        raise ConfigError(f"export_merge: true, but {adapters[-1]} is a {method.name} adapter, which adds "
                          "virtual tokens instead of changing weights and cannot be merged; remove "
                          "export_merge (the export is then the base with the adapter beside it)")
    return can if cfg.export.export_merge is None else bool(cfg.export.export_merge)


ADAPTER_DIR = "adapter"  # an export that keeps its adapter: the base at the top, the adapter here
LOADING = """# Loading this model

This folder is a base model with a {method} adapter beside it in `{adapter}/` ({why}).
Load both:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{folder}"), "{folder}/{adapter}")
```

`lathe chat {folder}` (and eval, predict) load it the same way.
"""


def save_export(model: Any, tokenizer: Any, folder: Path, *, dtype: str, max_shard_size: str | int,
                legacy: bool, chat_template: str | None, stop_ids: list[int], final_dir: Path) -> list[str]:
    """Weights, config, generation_config.json and tokenizer; returns the weight file names.
    A model that still carries an adapter is saved as its base plus the adapter in adapter/
    (naming `final_dir` as its base), with a LOADING.md."""
    import torch

    model = model.to(getattr(torch, dtype))
    if hasattr(model, "peft_config"):  # the adapter was kept apart
        from lathe.model.methods import method_of_peft_type

        config = model.peft_config["default"]
        method = method_of_peft_type(str(config.peft_type.value))
        config.base_model_name_or_path = str(final_dir.resolve())
        model.save_pretrained(str(folder / ADAPTER_DIR))
        name = method.name if method else str(config.peft_type.value)
        why = "it cannot be merged into the weights" if method and not method.can_merge else "export_merge: false"
        (folder / "LOADING.md").write_text(LOADING.format(method=name, adapter=ADAPTER_DIR, why=why,
                                                          folder=final_dir.resolve()), encoding="utf-8")
        model = model.get_base_model()
    set_stop_tokens(model, stop_ids)  # plain `generate` stops where training taught the model to
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    log(f"Saving weights ({dtype}, shards of at most {max_shard_size}"
        f"{', pytorch_model*.bin' if legacy else ''}) and the tokenizer")
    files = save_weights(model, folder, max_shard_size, legacy)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
    return files


def save_weights(model: Any, folder: Path, max_shard_size: str | int, legacy: bool = False) -> list[str]:
    """save_pretrained in shards of `max_shard_size`; `legacy` rewrites them as pytorch_model*.bin.

    transformers 5 writes safetensors only (its `safe_serialization` argument is gone), so
    the legacy format is converted shard by shard, keeping the same split and an index
    (pytorch_model.bin.index.json) that from_pretrained reads.
    """
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    if legacy:
        to_legacy_bin(folder)
    return sorted(p.name for p in folder.iterdir()
                  if p.name.endswith((".safetensors", ".bin", ".index.json")))


def to_legacy_bin(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        names = sorted(set(data["weight_map"].values()))
    else:
        data, names = None, ["model.safetensors"]
    renamed = {n: n.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin") for n in names}
    for name in names:
        torch.save(load_file(str(folder / name)), folder / renamed[name])
        (folder / name).unlink()
    if data is not None:
        data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        index.unlink()


# --- verification --------------------------------------------------------------------

def logit_bound(dtype: str, max_abs_logit: float, noise: float | None = None) -> float:
    """The largest accepted |export - reference| logit difference (see RELATIVE_BOUND)."""
    return max(RELATIVE_BOUND[dtype] * max(1.0, max_abs_logit), NOISE_FACTOR * (noise or 0.0))


def verify_export(cfg: LatheConfig, folder: Path, tokenizer: Any, template: Template, stop_ids: list[int],
                  dtype: str, base_path: str) -> dict[str, Any]:
    """Reload `folder` with plain transformers and check it against base + adapters unmerged:
    logits, the chat template's token ids, and the eos ids of generation_config.json."""
    from transformers import AutoTokenizer

    from lathe.model.load import stage_task

    convs = [_conversation(system, turns) for system, turns in VERIFY_CHATS]
    lm = stage_task(cfg.finetune.stage) == "causal_lm"
    if lm:
        inputs = [[t for p, r in template.encode_turns(c, tokenizer) for t in p + r] for c in convs]
    else:  # a task model reads plain text: the same sentences, tokenized as its data was
        inputs = [tokenizer(" ".join(m.content for m in c.messages))["input_ids"] for c in convs]
    logits, ours, base = compare_logits(cfg, folder, base_path, tokenizer, dtype, inputs)
    quantized = compare_with_quantized_base(cfg, base_path, tokenizer, inputs, ours,
                                            base if dtype == "float32" else None)
    exported_tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    checks, mismatch = compare_chat_template(exported_tok, tokenizer, template, convs) if lm else (0, None)
    if not lm:
        same = all(exported_tok(" ".join(m.content for m in c.messages))["input_ids"] == ids
                   for c, ids in zip(convs, inputs))
        mismatch = None if same else "the exported tokenizer tokenizes text differently from the run's"
    eos = _exported_eos(folder) if lm else []
    problems = []
    if not logits["max_abs_logit_diff"] <= logits["bound"]:  # `not <=` also catches nan
        problems.append(f"logits differ from base + adapters by {logits['max_abs_logit_diff']:.3g} "
                        f"(bound {logits['bound']:.3g} in {dtype})")
    if quantized is not None and not quantized["passed"]:
        problems.append(f"logits differ from the {quantized['bits']}-bit base + adapter it was trained on by "
                        f"{quantized['max_abs_logit_diff']:.3g}, more than {NOISE_FACTOR:g}x what the "
                        f"quantization itself moves them ({quantized['quantization_effect']:.3g})")
    if mismatch:
        problems.append(mismatch)
    eos_ok = eos == stop_ids or not stop_ids  # no stop tokens at all: the base's eos is left as it was
    if not eos_ok:
        problems.append(f"generation_config.json eos_token_id {eos} is not the template's stop tokens {stop_ids}")
    return {"passed": not problems, **logits, "dtype": dtype, "template": template.name if lm else None,
            "chat_template_matches": mismatch is None, "chat_template_checks": checks,
            "mismatch": mismatch, "eos_token_ids": eos, "stop_token_ids": stop_ids,
            "eos_matches": eos_ok, "quantized_base": quantized, "problems": problems}


def _conversation(system: str | None, turns: tuple[tuple[str, str], ...]) -> Conversation:
    msgs = tuple(Message(role, text) for pair in turns for role, text in zip(("user", "assistant"), pair))
    return Conversation(msgs, system=system)


def compare_logits(cfg: LatheConfig, folder: Path, base_path: str, tokenizer: Any, dtype: str,
                   inputs: list[list[int]]) -> tuple[dict[str, Any], list[Any], list[Any] | None]:
    """Max |export - reference| over every position and vocabulary entry, in float32. Also
    returns the export's logits and the base's (the reference with its last adapter off)."""
    import gc

    from lathe.model.load import auto_class, stage_task

    auto, _ = auto_class(stage_task(cfg.finetune.stage))  # the plain class users load it with
    exported = auto.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    if (folder / ADAPTER_DIR / "adapter_config.json").is_file():  # the pair, loaded as LOADING.md says
        from peft import PeftModel

        exported = PeftModel.from_pretrained(exported, str(folder / ADAPTER_DIR))
    ours = _logits(exported.eval(), inputs)
    del exported
    gc.collect()
    reference = reference_model(cfg, base_path, tokenizer, dtype)
    theirs = _logits(reference, inputs)
    effect = base = None
    if hasattr(reference, "disable_adapter"):
        with reference.disable_adapter():
            base = _logits(reference, inputs)
        effect = _max_diff(theirs, base)
    noise = None
    if dtype != "float32":  # the same weights computed in float32: how noisy the dtype is here
        reference.float()
        noise = _max_diff(theirs, _logits(reference, inputs))
    del reference
    diff = _max_diff(ours, theirs)
    scale = max(float(t.abs().max()) for t in theirs)
    report = {"max_abs_logit_diff": diff, "bound": logit_bound(dtype, scale, noise), "max_abs_logit": scale,
              "dtype_noise": noise, "last_adapter_effect": effect, "prompts": len(inputs)}
    return report, ours, base


def compare_with_quantized_base(cfg: LatheConfig, base_path: str, tokenizer: Any, inputs: list[list[int]],
                                ours: list[Any], base: list[Any] | None) -> dict[str, Any] | None:
    """A QLoRA adapter was trained on a 4/8-bit base but is merged into the full-precision one:
    the export's logits (`ours`) are also compared with the quantized base + adapter it was
    trained as. They differ by what quantization moves the logits (measured here as
    |quantized base - base|, `base`: the float32 base's logits, loaded when not given); the
    export passes within NOISE_FACTOR x that. None when no adapter was trained quantized."""
    import gc

    from lathe.model.load import head_kwargs, load_adapter, load_model, stage_task
    from lathe.runs import read_run_config

    task, head = stage_task(cfg.finetune.stage), head_kwargs(cfg)
    adapters = cfg.model.adapter_name_or_path or []
    trained = read_run_config(adapters[-1]) if adapters else {}
    bits = trained.get("quantization_bit")
    if not bits:
        return None
    if len(adapters) > 1:
        raise ModelError("several adapters on a quantized base: merge the earlier ones first (lathe export "
                         "in full precision), then train or export the last one on that export")
    log(f"Verifying against the {bits}-bit base the adapter was trained on")
    keys = {k: trained[k] for k in ("quantization_bit", "quantization_type", "double_quantization") if k in trained}
    in_float32 = dataclasses.replace(cfg.model, torch_dtype="float32")
    quantized = load_model(dataclasses.replace(cfg, model=dataclasses.replace(in_float32, **keys)), base_path,
                           tokenizer, task, head).eval()
    quantized_base = _logits(quantized, inputs)
    as_trained = _logits(load_adapter(quantized, adapters[-1], base_path).eval(), inputs)
    del quantized
    gc.collect()
    if base is None:
        base = _logits(load_model(dataclasses.replace(cfg, model=in_float32), base_path, tokenizer, task,
                                  head).eval(), inputs)
    effect = _max_diff(quantized_base, base)
    diff = _max_diff(ours, as_trained)
    return {"bits": bits, "max_abs_logit_diff": diff, "quantization_effect": effect,
            "bound": NOISE_FACTOR * effect, "passed": diff <= NOISE_FACTOR * effect}


def _max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def reference_model(cfg: LatheConfig, base_path: str, tokenizer: Any, dtype: str) -> Any:
    """Base model in `dtype` with the adapters applied as adapters: all but the last merged
    (as the export merged them), the last one live, unmerged, as training ran it."""
    from lathe.model.load import head_kwargs, load_adapter, load_model, stage_task

    in_dtype = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, torch_dtype=dtype))
    model = load_model(in_dtype, base_path, tokenizer, stage_task(cfg.finetune.stage), head_kwargs(cfg))
    adapters = cfg.model.adapter_name_or_path or []
    for i, adapter in enumerate(adapters):
        model = load_adapter(model, adapter, base_path)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


def _logits(model: Any, inputs: list[list[int]]) -> list[Any]:
    import torch

    out = []
    with torch.no_grad():  # P-tuning / prompt tuning put logits of their virtual tokens in front
        for ids in inputs:
            x = torch.tensor([ids])
            decoder = {"decoder_input_ids": x} if getattr(model.config, "is_encoder_decoder", False) else {}
            result = model(input_ids=x, **decoder)  # an encoder-decoder: teacher-forced on the text
            # a span head (QA) has start and end logits: compared as one [tokens, 2] tensor; a bare
            # encoder (embed) its token vectors
            if hasattr(result, "logits"):
                logits = result.logits[0]
            elif hasattr(result, "start_logits"):
                logits = torch.stack([result.start_logits[0], result.end_logits[0]], dim=-1)
            else:
                logits = result.last_hidden_state[0]
            out.append((logits[-len(ids):] if logits.dim() == 2 and logits.shape[0] >= len(ids) else logits).float())
    return out


def compare_chat_template(exported_tok: Any, tokenizer: Any, template: Template,
                          convs: list[Conversation]) -> tuple[int, str | None]:
    """The export's apply_chat_template against the template's ids (from the training
    tokenizer): generation prompts and whole conversations. Returns (checks, first mismatch)."""
    checks = 0
    for conv in convs:
        turns = conv.turns()
        history = [(u.content, a.content) for u, a in turns[:-1]]
        head = [{"role": "system", "content": conv.system}] if conv.system else []
        messages = head + [{"role": m.role, "content": m.content} for m in conv.messages]
        cases = [
            ("with add_generation_prompt", messages[:-1], True,
             template.encode_prompt(history, turns[-1][0].content, tokenizer, system=conv.system)),
            ("whole conversation", messages, False,
             [t for p, r in template.encode_turns(conv, tokenizer) for t in p + r]),
        ]
        for what, msgs, generation, expected in cases:
            checks += 1
            where = f"{what}, {'with' if conv.system else 'without'} a system prompt, {len(turns)} turn(s)"
            try:
                got = exported_tok.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=True,
                                                       return_dict=False)
            except Exception as e:  # noqa: BLE001 - Jinja raises its own errors (raise_exception)
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                return checks, f"the exported chat_template cannot render ({where}): {type(e).__name__}: {first}"
            got = list(got["input_ids"] if hasattr(got, "keys") else got)
            if got != expected:
                return checks, f"the exported chat_template renders differently ({where}): " + \
                    _first_difference(tokenizer, expected, got, template.name)
    return checks, None


def _first_difference(tokenizer: Any, ours: list[int], theirs: list[int], name: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))

    def around(ids: list[int]) -> str:
        after = tokenizer.decode(ids[i:i + 4]) if i < len(ids) else "(end)"
        return repr(tokenizer.decode(ids[max(0, i - 4):i]) + "|" + after)

    return f"first difference at token {i}: template {name} has {around(ours)} where apply_chat_template has " \
           f"{around(theirs)}"


def _exported_eos(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def print_report(report: dict[str, Any], out: Path) -> None:
    effect = report["last_adapter_effect"]
    log(f"Verification {'passed' if report['passed'] else 'FAILED'}:")
    log(f"  logits: max |export - (base + adapters unmerged)| = {report['max_abs_logit_diff']:.3g} "
        f"(bound {report['bound']:.3g}, {report['dtype']}, {report['prompts']} "
        f"{'conversations' if report['template'] else 'texts'})"
        + (f"; {report['dtype']} vs float32 on the same weights: {report['dtype_noise']:.3g}"
           if report["dtype_noise"] is not None else "")
        + (f"; the last adapter itself moves logits by {effect:.3g}" if effect is not None else ""))
    if effect is not None and effect <= report["bound"]:
        log("  note: the adapter changes the logits by less than the bound, so this check cannot tell "
            "the merged model from the base model")
    q = report.get("quantized_base")
    if q is not None:
        log(f"  against the {q['bits']}-bit base + adapter it was trained as: {q['max_abs_logit_diff']:.3g} "
            f"(bound {q['bound']:.3g}: {NOISE_FACTOR:g}x what {q['bits']}-bit quantization moves the base's "
            f"logits, {q['quantization_effect']:.3g})")
    if report["template"] is None:  # a task model
        log("  tokenizer: " + ("tokenizes the checked texts as the run did" if report["mismatch"] is None
                               else report["mismatch"]))
    else:
        log(f"  chat template ({report['template']}): "
            + ("renders the same token ids" if report["chat_template_matches"] else report["mismatch"])
            + f" ({report['chat_template_checks']} renderings)")
        log(f"  generation_config eos_token_id {report['eos_token_ids']}: "
            + ("the template's stop tokens" if report["eos_matches"] else f"expected {report['stop_token_ids']}"))
    log(f"  report: {out / REPORT}")


# --- the hub -------------------------------------------------------------------------

def push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload the export folder as written and verified (one commit, nothing re-serialized)."""
    from huggingface_hub import HfApi

    log(f"Pushing {folder} to the hub as {repo_id}")
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload model exported by Lathe")
    except Exception as e:  # noqa: BLE001 - network, auth and offline errors all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise OutputError(f"the export in {folder} is complete, but pushing it to hub repo {repo_id} failed "
                          f"({reason}); push it later with: hf upload {repo_id} {folder}") from None
    log(f"Pushed to https://huggingface.co/{repo_id}")
