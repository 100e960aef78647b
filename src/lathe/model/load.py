"""Tokenizer and model loading: local folders, hub ids, the embedded demo model."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig, ModelConfig
from lathe.errors import ModelError
from lathe.integrity import weights_problem
from lathe.quiet import quiet_weight_loading

DEMO_MODEL = "lathe:demo"


def resolve_model_path(name: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local folder (checked), the demo model (built once), a ModelScope id (`modelscope:org/name`:
    downloaded into its cache, or found there offline), or a hub id (left as is)."""
    quiet_weight_loading()  # every model load passes here first
    from lathe.model.fetch import is_modelscope, modelscope_model

    if is_modelscope(name):
        return modelscope_model(name, revision if revision not in (None, "main") else None, cache_dir)
    if name == DEMO_MODEL:
        from lathe.demo.build import ensure_demo_model

        return str(ensure_demo_model())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model_name_or_path {name} is a file; point it at the model's folder")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model_name_or_path {name} has no config.json; it is not a saved model folder "
                "(an adapter folder goes in adapter_name_or_path)"
            )
        problem = weights_problem(path)
        if problem:
            raise ModelError(f"model_name_or_path: {problem}; copy or download the model again")
        return str(path)
    if _looks_like_path(name):
        raise ModelError(f"model_name_or_path {name} does not exist; check the path")
    return hub_or_cached(name)


def hub_or_cached(name: str) -> str:
    """A hub id as is when the hub can be reached; else the folder of its copy in the local
    hub cache (nothing then asks the network), or one line at once when there is none."""
    from lathe import hub

    if not hub.offline():
        return name
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise ModelError(
        f"cannot load {name!r}: it is not a local folder, {hub.why_offline()}, and the local hub "
        "cache has no copy; download it where you are online and set model_name_or_path to that folder"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _hub_error(name: str, err: Exception) -> ModelError:
    from lathe import hub

    reason = hub.why_offline() if hub.offline_by_choice() else \
        f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return ModelError(
        f"cannot load {name!r}: it is not a local folder and the hub could not provide it "
        f"({reason}); download it where you are online and set model_name_or_path to that folder"
    )


def load_tokenizer(model_cfg: ModelConfig, path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path,
            trust_remote_code=model_cfg.trust_remote_code,
            cache_dir=model_cfg.cache_dir,
            revision=model_cfg.model_revision,
        )
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} ships its own code; set trust_remote_code: true if you trust it") from None
        if Path(path).is_dir():
            raise ModelError(f"{path}: the tokenizer could not be loaded ({str(e).splitlines()[0][:160]})") from None
        raise _hub_error(path, e) from None
    tok.padding_side = "right"
    return tok


def fix_pad_token(tokenizer: Any) -> str | None:
    """Give the tokenizer a pad token if it has none; returns a note for the summary."""
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return f"pad token set to eos ({tokenizer.eos_token!r}); padding is masked from the loss"
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return "pad token <|pad|> added (the tokenizer had neither pad nor eos)"


def pick_dtype(cfg: LatheConfig) -> Any:
    """auto: float32 on CPU and for full/freeze; half precision for LoRA on a GPU."""
    import torch

    requested = cfg.model.torch_dtype
    if requested != "auto":
        return getattr(torch, requested)
    if not torch.cuda.is_available() or cfg.finetune.finetuning_type != "lora":
        return torch.float32
    if cfg.train.fp16 or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


_ATTENTION = {"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}
_FLASH_PACKAGE = {"fa2": "flash_attn", "fa3": "flash_attn_interface"}


def attention_kwargs(flash_attn: str) -> dict[str, str]:
    """`flash_attn` -> from_pretrained's attn_implementation (auto: transformers chooses). A
    FlashAttention kernel this machine cannot run falls back to sdpa, and says so."""
    import importlib.util

    import torch

    if flash_attn == "auto":
        return {}
    package = _FLASH_PACKAGE.get(flash_attn)
    if package and not (torch.cuda.is_available() and importlib.util.find_spec(package)):
        print(f"flash_attn: {flash_attn} needs a CUDA GPU and the {package} package; using sdpa",
              file=sys.stderr, flush=True)
        return {"attn_implementation": "sdpa"}
    return {"attn_implementation": _ATTENTION[flash_attn]}


def quantization_kwargs(cfg: LatheConfig) -> dict[str, Any]:
    """quantization_bit -> from_pretrained's BitsAndBytesConfig (QLoRA's base); computations
    run in the run's dtype (float32 on a CPU, bf16/fp16 on a GPU)."""
    m = cfg.model
    if m.quantization_bit is None:
        return {}
    from transformers import BitsAndBytesConfig

    if m.quantization_bit == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=m.quantization_type,
        bnb_4bit_use_double_quant=m.double_quantization, bnb_4bit_compute_dtype=pick_dtype(cfg))}


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


# What a model is loaded as, per task: the transformers auto class and its extra arguments.
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "causal_lm": ("AutoModelForCausalLM", {}),
    "reward": ("AutoModelForSequenceClassification", {"num_labels": 1}),  # the LM with a scalar head
    "seq_cls": ("AutoModelForSequenceClassification", {}),  # + the label set's num_labels, id2label
    "token_cls": ("AutoModelForTokenClassification", {}),  # + the tag set's
    "seq2seq": ("AutoModelForSeq2SeqLM", {}),  # an encoder-decoder (T5, BART, mT5, Marian ...)
    "qa": ("AutoModelForQuestionAnswering", {}),  # start and end logits over the tokens
    "embed": ("AutoModel", {}),  # the bare model: token vectors, pooled into one per text
}
# The task each stage trains (the others: causal_lm), what its head is called in messages,
# and peft's task_type for its adapters (which decides what peft saves beside them).
STAGE_TASK = {"rm": "reward", "cls": "seq_cls", "tagging": "token_cls", "seq2seq": "seq2seq", "qa": "qa",
              "embed": "embed"}
HEAD_WORDS = {"seq_cls": "sequence-classification", "reward": "sequence-classification",
              "token_cls": "token-classification", "seq2seq": "sequence-to-sequence (encoder-decoder)",
              "qa": "question-answering (span)", "embed": "feature-extraction"}
PEFT_TASK_TYPE = {"causal_lm": "CAUSAL_LM", "reward": "SEQ_CLS", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS",
                  "seq2seq": "SEQ_2_SEQ_LM", "qa": "QUESTION_ANS", "embed": "FEATURE_EXTRACTION"}
# Models users know that have each head (named in the refusal when theirs has none).
_KNOWN_FAMILIES = ("bert", "roberta", "deberta-v2", "distilbert", "xlm-roberta", "t5", "bart", "gpt2",
                   "llama", "qwen2", "mistral", "bloom", "opt", "gpt_neo")


def stage_task(stage: str) -> str:
    return STAGE_TASK.get(stage, "causal_lm")


def auto_class(task: str) -> tuple[Any, dict[str, Any]]:
    import transformers

    name, extra = TASKS[task]
    return getattr(transformers, name), dict(extra)


def check_task_head(path: str, task: str, stage: str, trust_remote_code: bool = False) -> None:
    """Before loading: the model's architecture has the head `task` needs (a classifier on
    T5, a seq2seq model on GPT-2 ...), else one line naming the families that have it."""
    if task == "causal_lm":
        return
    from transformers import AutoConfig

    auto, _ = auto_class(task)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # loading reports it, with its own message
    if type(config) in auto._model_mapping or auto.__name__ in (getattr(config, "auto_map", None) or {}):
        return
    mapping = auto._model_mapping._model_mapping
    have = [m for m in _KNOWN_FAMILIES if m.replace("-", "_") in mapping or m in mapping]
    raise ModelError(f"stage {stage} needs a model with a {HEAD_WORDS.get(task, task)} head, and "
                     f"{config.model_type} has none in transformers; use another model (these have one: "
                     f"{', '.join(have)})")


# A task model made from a checkpoint of another kind: its new head is missing from the file
# (created here), and the checkpoint's own head is not used; transformers' load report of
# exactly that is expected and hidden. Any other key in it shows the whole report.
NEW_HEADS = ("score", "classifier", "classification_head", "qa_outputs")
UNUSED_HEADS = ("lm_head", "cls", "final_logits_bias")


class _ExpectedHeadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        keys = [line.split("|")[0].strip() for line in text.splitlines() if "|" in line]
        keys = [k for k in keys if k and k != "Key"]
        return not keys or any(k.split(".")[0] not in NEW_HEADS + UNUSED_HEADS for k in keys)


@contextlib.contextmanager
def new_head_report_hidden() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _ExpectedHeadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load_model(cfg: LatheConfig, path: str, tokenizer: Any, task: str = "causal_lm",
               head: dict[str, Any] | None = None) -> Any:
    """The model at `path` as `task` needs it (TASKS; `head`: the task head's arguments, e.g.
    num_labels), in the run's dtype and attention kernel, quantized when quantization_bit is
    set, its embeddings grown to the tokenizer."""
    from lathe.model.quant.store import is_quantized_dir

    if is_quantized_dir(path):  # a `lathe quantize` folder: predicted with, chatted with; not trained
        return _load_quantized(cfg, path, tokenizer, task)
    auto, extra = auto_class(task)
    extra.update(head or {})
    try:
        with new_head_report_hidden():
            model = auto.from_pretrained(
                path,
                **extra,
                dtype=pick_dtype(cfg),
                **attention_kwargs(cfg.model.flash_attn),
                **quantization_kwargs(cfg),
                trust_remote_code=cfg.model.trust_remote_code,
                cache_dir=cfg.model.cache_dir,
                revision=cfg.model.model_revision,
            )
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} ships its own code; set trust_remote_code: true if you trust it") from None
        if Path(path).is_dir():
            raise ModelError(f"{path}: the model could not be loaded ({str(e).splitlines()[0][:200]})") from None
        raise _hub_error(path, e) from None
    fit_embeddings(model, tokenizer)
    _keep_used_conversions(model)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    from transformers import set_seed

    # what is made next (adapters) starts from the same random state however the weights were
    # loaded: DeepSpeed ZeRO-3 creates them sharded, drawing random numbers of its own
    set_seed(cfg.train.seed)
    return model


def _keep_used_conversions(model: Any) -> None:
    """The checkpoint renamings the model remembers for saving: only those its checkpoint used,
    as transformers keeps them after a plain load. Its DeepSpeed ZeRO-3 load path (transformers
    5.24, integrations/deepspeed.py) keeps every renaming of the architecture instead, legacy ones
    included, and save_pretrained then writes BERT's LayerNorm weight and bias as gamma and beta:
    a file the single-process run's names do not match (found by tests/e2e/test_distributed.py)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Embedding rows grown to the tokenizer (pad or added tokens) and its pad id in the config.
    Under DeepSpeed ZeRO-3 the weight is this rank's shard: its full shape is ds_shape."""
    rows = model.get_input_embeddings().weight
    if len(tokenizer) > getattr(rows, "ds_shape", rows.shape)[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def _load_quantized(cfg: LatheConfig, path: str, tokenizer: Any, task: str) -> Any:
    from lathe.model.quant.store import load_quantized

    if cfg.command == "train" and cfg.train.do_train:
        raise ModelError(f"{path} is a quantized model (lathe quantize), whose integer weights cannot be "
                         "trained; train the float model it was made from (its quantization.json names it) and "
                         "quantize again, or train with quantization_aware_training: true")
    model = load_quantized(path, task, cfg.model.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def head_kwargs(cfg: LatheConfig) -> dict[str, Any]:
    """A task run's head as its config records it (label_names, problem_type), for loading it
    again (predict, export); {} for other stages."""
    task = stage_task(cfg.finetune.stage)
    if task == "token_cls" and cfg.task.label_names:
        return classifier_head("token_classification", cfg.task.label_names)
    if task != "seq_cls" or cfg.task.problem_type == "auto":
        return {}
    return classifier_head(cfg.task.problem_type, cfg.task.label_names or [])


def classifier_head(problem_type: str, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """from_pretrained's arguments for a classification head: num_labels, problem_type and,
    for classes, id2label / label2id (saved in config.json, read by pipelines and predict)."""
    if problem_type == "regression":
        return {"num_labels": 1, "problem_type": problem_type}
    kinds = {"problem_type": problem_type} if problem_type != "token_classification" else {}
    return {"num_labels": len(names), **kinds, "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


# --- inference: a trained model as chat, eval, predict and export see it ------------------

def load_for_inference(cfg: LatheConfig, merge: bool = True, merge_last: bool = True) -> tuple[Any, Any, str]:
    """Base model + the adapters of `adapter_name_or_path` (merged into the weights when
    `merge` and their method can merge; the last one only when `merge_last` too), in eval
    mode, with its tokenizer; also returns the resolved model path.

    An adapter that does not fit the base model is a ModelError naming the first
    tensor whose shape differs."""
    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.model_revision, cfg.model.cache_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    fix_pad_token(tokenizer)
    task = stage_task(cfg.finetune.stage)
    check_task_head(path, task, cfg.finetune.stage, cfg.model.trust_remote_code)
    model = load_model(cfg, path, tokenizer, task, head_kwargs(cfg))
    adapters = cfg.model.adapter_name_or_path or []
    if is_quantized(model):  # merging into 4/8-bit weights would round them: the adapter stays apart
        merge = False
        if len(adapters) > 1:
            raise ModelError("quantization_bit with several adapters: merge them first with lathe export "
                             "(in full precision), then load the export with quantization_bit")
    from lathe.model.methods import method_of_adapter

    for i, adapter in enumerate(adapters):
        model = load_adapter(model, adapter, path)
        method = method_of_adapter(adapter)
        last = i == len(adapters) - 1
        if merge and (merge_last or not last) and (method is None or method.can_merge):
            # prompt learning stays an adapter
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, path


def load_adapter(model: Any, adapter: str, base_path: str, is_trainable: bool = False) -> Any:
    """PeftModel.from_pretrained with a one-line error when the adapter is missing, or was
    trained on another base model (shapes or module names differ)."""
    import json

    from peft import PeftModel

    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():
            raise ModelError(f"adapter_name_or_path {adapter} holds a full model (config.json, no "
                             "adapter_config.json), not an adapter; set model_name_or_path to it "
                             "and remove adapter_name_or_path")
        what = "does not exist" if not folder.exists() else "has no adapter_config.json"
        raise ModelError(f"adapter_name_or_path {adapter} {what}; point it at a run's output_dir "
                         "(or a checkpoint folder) trained with an adapter method (lora, ia3, prefix, ...)")
    problem = weights_problem(folder)
    if problem:
        raise ModelError(f"adapter_name_or_path: {problem}; train or copy the adapter again")
    try:
        trained_on = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        trained_on = None
    hint = f" (its adapter_config.json names base model {trained_on})" if trained_on else ""
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except RuntimeError as e:
        detail = _first_size_mismatch(str(e))
        raise ModelError(f"adapter {adapter} does not fit base model {base_path}: {detail}; "
                         f"was it trained on another model?{hint}") from None
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"adapter {adapter} does not fit base model {base_path}: {first}{hint}") from None


def _first_size_mismatch(message: str) -> str:
    """'size mismatch for <name>: copying a param with shape A ..., the shape in current
    model is B' -> '<name> is A in the adapter but B in the model'."""
    import re

    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\)"
                  r".*?current model is torch.Size\((\[[^\]]*\])\)", message, re.S)
    if not m:
        return message.strip().splitlines()[0][:200]
    name = m.group(1).replace("base_model.model.", "")
    return f"{name} is {m.group(2)} in the adapter but {m.group(3)} in the model"
