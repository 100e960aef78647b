"""LLaMA-Factory's config keys, and what Lathe does with each.

Every key of LLaMA-Factory's documented argument groups (model, quantization, data,
finetuning, generating, export, evaluation ...) has one entry here, so a config written
for `llamafactory-cli` either runs as written or stops with one line that says what the
key does there and what Lathe offers instead. The kinds:

- same:     Lathe has the key, with the same name and meaning.
- alias:    Lathe has it under another name; the value is carried over (`to`, `convert`).
- accepted: it only steers LLaMA-Factory's machinery; Lathe accepts it and does the right
            thing without it (`values` lists the values that mean that; others are refused).
- later:    an issue of ours brings it (`note` says which); refused until then.
- no:       deliberately not supported; `note` says what Lathe offers instead.

A `later` or `no` key set to LLaMA-Factory's own default changes nothing there, so it is
accepted too (`use_unsloth: false`, `pissa_init: false`). `lathe keys
--from-llamafactory` prints this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lathe.errors import ConfigError

_UNSET = object()


@dataclass(frozen=True)
class Key:
    group: str
    kind: str  # same | alias | accepted | later | no
    what: str = ""  # what the key does in LLaMA-Factory (for refusals)
    note: str = ""  # what Lathe does or offers instead
    default: Any = _UNSET  # LLaMA-Factory's default: a no-op value there
    to: str | None = None  # alias: the Lathe key
    convert: Callable[[Any], Any] | None = None  # alias: value -> Lathe value
    values: tuple[Any, ...] | None = None  # accepted: the values that are harmless here


def _same(group: str, *names: str) -> dict[str, Key]:
    return {n: Key(group, "same") for n in names}


def _not(value: Any) -> bool:
    from lathe.config.coerce import coerce

    return not coerce("disable_gradient_checkpointing", value, bool)


def _pure_bf16(value: Any) -> str:
    from lathe.config.coerce import coerce

    return "bfloat16" if coerce("pure_bf16", value, bool) else "auto"


_VISION = "text models only: Lathe trains language models, with no image, video or audio inputs"
_SERVE = "Lathe serves with its own engine on transformers (lathe chat, lathe api); vLLM is not built in yet"
_OPTIM = ("Lathe trains with LoRA, freeze or full tuning and any transformers optimizer "
          "(optim: adamw_torch, adafactor, galore_adamw with optim_target_modules, ...)")

KEYS: dict[str, Key] = {
    # --- model ------------------------------------------------------------------------
    **_same("model", "model_name_or_path", "adapter_name_or_path", "cache_dir", "model_revision",
            "trust_remote_code"),
    "adapter_folder": Key("model", "no", "a folder of several adapters to load",
                          "list them in adapter_name_or_path (comma-separated)", None),
    "use_fast_tokenizer": Key("model", "accepted", note="the tokenizer folder decides (fast when it "
                              "has tokenizer.json)", values=(True,)),
    "resize_vocab": Key("model", "accepted", note="embeddings are resized whenever the tokenizer "
                        "is larger than the model"),
    "split_special_tokens": Key("model", "no", "tokenize special tokens as plain text",
                                "special tokens are always kept whole", False),
    "add_tokens": Key("model", "no", "add tokens to the tokenizer", "add them with "
                      "tokenizer.add_tokens(...) and save_pretrained, then point model_name_or_path "
                      "at that folder (Lathe resizes the embeddings)", None),
    "add_special_tokens": Key("model", "no", "add special tokens to the tokenizer", "add them with "
                              "tokenizer.add_special_tokens(...) and save_pretrained, then point "
                              "model_name_or_path at that folder (Lathe resizes the embeddings)", None),
    "new_special_tokens_config": Key("model", "no", "describe new special tokens for their "
                                     "initialisation", "see add_special_tokens", None),
    "init_special_tokens": Key("model", "no", "how new special tokens are initialised",
                               "new embeddings are initialised by transformers", "noise_init"),
    "low_cpu_mem_usage": Key("model", "accepted", note="transformers 5 always loads lazily"),
    "rope_scaling": Key("model", "no", "stretch RoPE to longer contexts", "edit rope_scaling in the "
                        "model's config.json (transformers reads it there)", None),
    "flash_attn": Key("model", "same"),
    "shift_attn": Key("model", "no", "LongLoRA's shifted sparse attention",
                      "train at the length you need with cutoff_len (and packing)", False),
    "mixture_of_depths": Key("model", "no", "convert to a mixture-of-depths model",
                             "train the model as it is", None),
    "use_unsloth": Key("model", "later", "Unsloth's fused kernels for LoRA",
                       "faster training arrives with issue 19 (padding-free batches, fused losses)", False),
    "use_unsloth_gc": Key("model", "no", "Unsloth's offloaded gradient checkpointing",
                          "use gradient_checkpointing: true", False),
    "enable_liger_kernel": Key("model", "alias", to="use_liger_kernel",
                               note="TrainingArguments' name for Liger's kernels (a CUDA GPU and liger-kernel)"),
    "moe_aux_loss_coef": Key("model", "no", "weight of the router loss of mixture-of-experts "
                             "models", "set router_aux_loss_coef in the model's config.json", None),
    "disable_gradient_checkpointing": Key("model", "alias", to="gradient_checkpointing", convert=_not,
                                          note="Lathe's gradient_checkpointing, unset, is on only where the "
                                          "plan says memory needs it"),
    "use_reentrant_gc": Key("model", "accepted", note="gradient_checkpointing_kwargs (a "
                            "TrainingArguments key) chooses the variant"),
    "upcast_layernorm": Key("model", "no", "keep layer norms in float32", "use torch_dtype: "
                            "float32 with bf16: true (mixed precision keeps float32 weights)", False),
    "upcast_lmhead_output": Key("model", "no", "compute the logits in float32", "use torch_dtype: "
                                "float32 with bf16: true (mixed precision keeps float32 weights)", False),
    "train_from_scratch": Key("model", "no", "train randomly initialised weights", "save a "
                              "model initialised from its config with save_pretrained and train it "
                              "with stage: pt", False),
    **_same("serve", "infer_backend"),  # lathe api: huggingface (Lathe's engine); vllm is refused there
    "offload_folder": Key("model", "accepted", note="Lathe does not offload weights to disk"),
    "use_kv_cache": Key("model", "accepted", note="generation always uses the KV cache", values=(True,)),
    "use_v1_kernels": Key("model", "no", "LLaMA-Factory's own fused kernels",
                          "speed work arrives with issue 19", False),
    "infer_dtype": Key("model", "alias", to="torch_dtype", note="one dtype key for training "
                       "and inference"),
    "hf_hub_token": Key("model", "no", "a Hugging Face token in the config", "set HF_TOKEN in the "
                        "environment (or `hf auth login`) so the token never lands in config.yaml", None),
    "ms_hub_token": Key("model", "no", "a ModelScope token in the config", "set MODELSCOPE_API_TOKEN "
                        "in the environment so the token never lands in config.yaml", None),
    "om_hub_token": Key("model", "no", "a Modelers token in the config", "download the model "
                        "and point model_name_or_path at the folder", None),
    "print_param_status": Key("model", "accepted", note="the run summary prints trainable and "
                              "total parameters"),
    "compute_dtype": Key("model", "accepted", note="derived from bf16 / fp16", values=(None,)),
    "device_map": Key("model", "accepted", note="derived by Lathe and accelerate", values=(None,)),
    "model_max_length": Key("model", "accepted", note="derived from cutoff_len", values=(None,)),
    "block_diag_attn": Key("model", "accepted", note="packing: true never lets packed examples "
                           "see each other", values=(None, False)),
    # --- quantization -------------------------------------------------------------------
    **_same("quantization", "quantization_method", "quantization_bit", "quantization_type",
            "double_quantization"),
    "quantization_device_map": Key("quantization", "accepted", "device map of a 4-bit model at "
                                   "inference", "a quantized model is placed by transformers (device_map "
                                   "auto on GPUs)", None),
    # --- vision / audio -----------------------------------------------------------------
    **{k: Key("multimodal", "no", "image, video and audio preprocessing", _VISION, d) for k, d in {
        "image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32, "image_do_pan_and_scan": False,
        "crop_to_patches": False, "video_max_pixels": 256 * 256, "video_min_pixels": 16 * 16,
        "video_fps": 2.0, "video_maxlen": 128, "use_audio_in_video": False,
        "audio_sampling_rate": 16000, "media_dir": None}.items()},
    "freeze_vision_tower": Key("multimodal", "accepted", note=_VISION),
    "freeze_multi_modal_projector": Key("multimodal", "accepted", note=_VISION),
    "freeze_language_model": Key("multimodal", "no", "train only the vision part of a multimodal "
                                 "model", _VISION, False),
    # --- export -------------------------------------------------------------------------
    **_same("export", "export_dir", "export_size", "export_legacy_format", "export_hub_model_id"),
    "export_device": Key("export", "accepted", note="lathe export merges on the CPU, or on the GPU "
                         "the model loads on", values=("cpu", "auto")),
    "export_quantization_bit": Key("export", "no", "quantize the exported model (GPTQ)",
                                   "quantize the export with lathe quantize (quantization_scheme: "
                                   "int4_weight_only, int8_static with calibration_dataset, ...)", None),
    "export_quantization_dataset": Key("export", "no", "calibration data for the export quantization",
                                       "lathe quantize reads calibration_dataset", None),
    "export_quantization_nsamples": Key("export", "no", "calibration rows",
                                        "lathe quantize reads calibration_samples", 128),
    "export_quantization_maxlen": Key("export", "no", "calibration length",
                                      "lathe quantize renders calibration rows with the run's cutoff_len", 1024),
    # --- inference engines --------------------------------------------------------------
    **{k: Key("engines", "no", "settings of the vLLM / SGLang / KTransformers engines", _SERVE, d)
       for k, d in {"vllm_maxlen": 4096, "vllm_gpu_util": 0.7, "vllm_enforce_eager": False,
                    "vllm_max_lora_rank": 32, "vllm_config": None, "sglang_maxlen": 4096,
                    "sglang_mem_fraction": 0.7, "sglang_tp_size": -1, "sglang_config": None,
                    "sglang_lora_backend": "triton", "use_kt": False, "kt_cpu_activation": None,
                    "kt_weight_path": None, "kt_non_expert_weight_path": None,
                    "kt_expert_checkpoint_path": None, "kt_use_lora_experts": None,
                    "kt_lora_expert_num": None, "kt_lora_expert_intermediate_size": None}.items()},
    # --- data ---------------------------------------------------------------------------
    **_same("data", "template", "dataset", "eval_dataset", "dataset_dir", "cutoff_len",
            "train_on_prompt", "streaming", "mix_strategy", "interleave_probs", "overwrite_cache",
            "preprocessing_batch_size", "preprocessing_num_workers", "max_samples", "val_size",
            "packing"),
    "mask_history": Key("data", "alias", to="train_on_last_turn_only"),
    "buffer_size": Key("data", "accepted", note="streamed rows are read in order; shuffle the "
                       "files beforehand"),
    "eval_num_beams": Key("data", "alias", to="num_beams", note="one beam setting for all generation"),
    "ignore_pad_token_for_loss": Key("data", "accepted", note="padding is never trained",
                                     values=(True,)),
    "eval_on_each_dataset": Key("data", "no", "report eval metrics per eval dataset", "run one "
                                "do_predict per eval_dataset", False),
    "neat_packing": Key("data", "alias", to="packing", note="Lathe's packing never lets packed "
                        "examples see each other"),
    "tool_format": Key("data", "no", "how tool calls are written", "each template writes tools its "
                       "own way (qwen, glm, llama3 ...); template: auto uses the tokenizer's", None),
    "default_system": Key("data", "no", "replace the template's system prompt", "give a dataset "
                          "entry system_prompt in dataset_info.json (or a system column); lathe "
                          "chat takes --system", None),
    "enable_thinking": Key("data", "accepted", note="choose template: qwen3 (thinking) or "
                           "qwen3_nothink", values=(True,)),
    "preserve_thinking": Key("data", "no", "keep earlier turns' thinking text", "the qwen3 "
                             "template keeps what the data holds", False),
    "tokenized_path": Key("data", "accepted", note="tokenized data is cached automatically, keyed "
                          "by the files, data keys, tokenizer and template (overwrite_cache: true "
                          "redoes it)"),
    "data_shared_file_system": Key("data", "accepted", note="every node tokenizes into its own "
                                   "cache"),
    # --- finetuning ---------------------------------------------------------------------
    **_same("finetuning", "stage", "finetuning_type", "freeze_trainable_layers",
            "freeze_trainable_modules", "freeze_extra_modules", "lora_alpha", "lora_dropout",
            "lora_rank", "lora_target", "pref_beta", "pref_ftx", "pref_loss", "kto_chosen_weight",
            "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm",
            "ppo_target", "ppo_whiten_rewards", "ref_model", "reward_model", "early_stopping_steps",
            "plot_loss"),
    "additional_target": Key("finetuning", "same"),
    **_same("finetuning", "loraplus_lr_ratio", "loraplus_lr_embedding", "pissa_init", "pissa_iter",
            "pissa_convert", "create_new_adapter"),
    "use_rslora": Key("finetuning", "same"),
    "use_dora": Key("finetuning", "same"),
    "module_dropout": Key("finetuning", "no", "OFT dropout", "use LoRA, IA3 or AdaLoRA", 0.0),
    "oft_rank": Key("finetuning", "no", "OFT rank", "use LoRA, IA3 or AdaLoRA", 0),
    "oft_block_size": Key("finetuning", "no", "OFT block size", "use LoRA, IA3 or AdaLoRA", 32),
    "oft_target": Key("finetuning", "no", "OFT target modules", "use LoRA, IA3 or AdaLoRA",
                      "all"),
    "pref_bco_weight": Key("finetuning", "no", "a BCO term in the DPO loss", "pref_loss: sigmoid, "
                           "hinge, ipo, orpo or simpo", 0.0),
    "dpo_label_smoothing": Key("finetuning", "alias", to="pref_label_smoothing"),
    "ref_model_adapters": Key("finetuning", "no", "adapters on the reference model", "with LoRA the "
                              "reference is the starting model (the adapter off, or a frozen copy of "
                              "adapter_name_or_path); ref_model takes a full model folder", None),
    "ref_model_quantization_bit": Key("finetuning", "no", "a quantized reference model", "with LoRA "
                                      "or QLoRA the reference is the policy's own base with the adapter "
                                      "off: no second model to quantize", None),
    "reward_model_adapters": Key("finetuning", "no", "adapters on the reward model", "reward_model "
                                 "takes the run directory of an rm stage (adapter or full)", None),
    "reward_model_quantization_bit": Key("finetuning", "no", "a quantized reward model",
                                         "ppo loads the reward model in the run's dtype (lathe quantize "
                                         "makes int8 models for serving)", None),
    "reward_model_type": Key("finetuning", "accepted", "lora, full or api", "Lathe reads the kind "
                             "from the rm run directory", values=("lora", "full")),
    "ld_alpha": Key("finetuning", "no", "LD-DPO length weighting", "pref_loss: simpo normalises by "
                    "length", None),
    **{k: Key("finetuning", "no", "GaLore / APOLLO / BAdam / Adam-mini / Muon optimizers", _OPTIM, d)
       for k, d in {"use_galore": False, "galore_target": "all", "galore_rank": 16,
                    "galore_update_interval": 200, "galore_scale": 2.0, "galore_proj_type": "std",
                    "galore_layerwise": False, "use_apollo": False, "apollo_target": "all",
                    "apollo_rank": 16, "apollo_update_interval": 200, "apollo_scale": 32.0,
                    "apollo_proj": "random", "apollo_proj_type": "std", "apollo_scale_type": "channel",
                    "apollo_layerwise": False, "apollo_scale_front": False, "use_badam": False,
                    "badam_mode": "layer", "badam_start_block": None, "badam_switch_mode": "ascending",
                    "badam_switch_interval": 50, "badam_update_ratio": 0.05,
                    "badam_mask_mode": "adjacent", "badam_verbose": 0, "use_adam_mini": False,
                    "use_muon": False, "use_llama_pro": False}.items()},
    **{k: Key("finetuning", "no", "SwanLab experiment tracking", "report_to: tensorboard (or wandb, "
              "mlflow ... where installed)", d)
       for k, d in {"use_swanlab": False, "swanlab_project": "llamafactory", "swanlab_workspace": None,
                    "swanlab_run_name": None, "swanlab_mode": "cloud", "swanlab_api_key": None,
                    "swanlab_logdir": None, "swanlab_lark_webhook_url": None,
                    "swanlab_lark_secret": None}.items()},
    "pure_bf16": Key("finetuning", "alias", to="torch_dtype", convert=_pure_bf16,
                     note="pure_bf16: true is torch_dtype: bfloat16"),
    **{k: Key("finetuning", "no", "Megatron / HyperParallel training backends", "DDP, DeepSpeed "
              "and FSDP through torchrun (issue 18)", d)
       for k, d in {"use_mca": False, "use_megatron_bridge": False, "megatron_bridge_args": None,
                    "use_hyper_parallel": False, "hyper_parallel_args": None,
                    "hyper_parallel_cp_size": 1}.items()},
    **{k: Key("finetuning", "no", "alternative SFT losses (DFT, ASFT, EAFT)", "sft trains with "
              "cross-entropy on the reply tokens", d)
       for k, d in {"use_dft_loss": False, "use_asft_loss": False, "asft_alpha": 0.1,
                    "use_eaft_loss": False, "eaft_alpha": 1.0}.items()},
    "compute_accuracy": Key("finetuning", "no", "token accuracy at evaluation", "do_predict with "
                            "predict_with_generate scores replies (BLEU, ROUGE)", False),
    "disable_shuffling": Key("finetuning", "no", "train in file order", "the order is shuffled "
                             "with seed, the same on every repeat", False),
    "include_effective_tokens_per_second": Key("finetuning", "accepted", note="the progress bar "
                                               "shows trained tokens/s"),
    # --- generating ---------------------------------------------------------------------
    **_same("generating", "do_sample", "temperature", "top_p", "top_k", "num_beams",
            "max_new_tokens", "repetition_penalty"),
    "max_length": Key("generating", "no", "the longest prompt + reply when generating",
                      "max_new_tokens bounds the reply; cutoff_len the prompt", 1024),
    "length_penalty": Key("generating", "no", "beam search's length penalty",
                          "num_beams with the model's generation_config", 1.0),
    "skip_special_tokens": Key("generating", "accepted", note="replies are decoded without "
                               "special tokens", values=(True,)),
    # --- evaluation ---------------------------------------------------------------------
    **_same("evaluation", "task", "task_dir", "seed", "lang", "n_shot", "save_dir"),
    "batch_size": Key("evaluation", "alias", to="per_device_eval_batch_size"),
    "download_mode": Key("evaluation", "accepted", note="benchmarks are read from task_dir, "
                         "never downloaded"),
    # --- training extras ----------------------------------------------------------------
    "overwrite_output_dir": Key("training", "same"),
    **{k: Key("training", "no", "Ray workers", "torchrun (or accelerate launch) starts the processes; "
              "see the README's Several GPUs section", d)
       for k, d in {"ray_num_workers": 1, "ray_init_kwargs": None, "master_addr": None,
                    "master_port": None, "ray_run_name": None, "ray_storage_path": None,
                    "resources_per_worker": None, "placement_strategy": None}.items()},
    **{k: Key("training", "no", "the torch profiler", "run under `python -m torch.utils.bottleneck` "
              "or nsys; benchmarks/ measures speed", d)
       for k, d in {"enable_torch_profiler": False, "profiler_output_dir": None,
                    "profiler_wait_steps": 1, "profiler_warmup_steps": 1, "profiler_active_steps": 1,
                    "profiler_repeat": 1, "profiler_record_shapes": True,
                    "profiler_profile_memory": True, "profiler_with_stack": True,
                    "profile_modules": None}.items()},
    **{k: Key("training", "no", "FP8 training on Hopper GPUs", "bf16: true", d)
       for k, d in {"fp8": False, "fp8_backend": "auto", "fp8_enable_fsdp_float8_all_gather": False}.items()},
    "generation_max_length": Key("training", "no", "the longest prompt + reply in predict",
                                 "max_new_tokens", None),
    "generation_num_beams": Key("training", "alias", to="num_beams"),
    "sortish_sampler": Key("training", "accepted", note="predict sorts prompts by length itself"),
    # --- names from older LLaMA-Factory versions ------------------------------------------
    "dpo_beta": Key("older names", "alias", to="pref_beta"),
    "dpo_loss": Key("older names", "alias", to="pref_loss"),
    "dpo_ftx": Key("older names", "alias", to="pref_ftx"),
    "checkpoint_dir": Key("older names", "alias", to="adapter_name_or_path"),
    "dev_ratio": Key("older names", "alias", to="val_size"),
    "max_source_length": Key("older names", "no", "the prompt's share of the length",
                             "cutoff_len bounds prompt + reply and cuts both in proportion", None),
}


def translate(raw: dict[str, Any], lathe_keys: set[str]) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory keys in `raw` -> Lathe keys (aliases carried over, harmless keys dropped);
    returns the new mapping and notes for the run summary. A key Lathe does not have
    (`later`, `no`) set to anything but LLaMA-Factory's default is a ConfigError."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in raw.items():
        entry = KEYS.get(key) if isinstance(key, str) and key not in lathe_keys else None
        if entry is None or entry.kind == "same":
            out[key] = value
        elif entry.kind == "alias":
            if entry.to in raw:
                raise ConfigError(f"{key} and {entry.to} are both set; {key} is LLaMA-Factory's name "
                                  f"for {entry.to}, keep one")
            out[entry.to] = entry.convert(value) if entry.convert else value
        elif entry.kind == "accepted":
            if entry.values is not None and not _among(value, entry.values):
                allowed = ", ".join(str(v).lower() if v is not None else "null" for v in entry.values)
                raise ConfigError(f"{key}: {value} is not supported in Lathe ({entry.note}); "
                                  f"remove it or set {allowed}")
            if entry.values is None or not _among(value, entry.values[:1]):
                notes.append(f"{key} (LLaMA-Factory) has no effect here: {entry.note}")
        elif entry.default is not _UNSET and _among(value, (entry.default,)):
            continue  # LLaMA-Factory's own default: nothing to do there either
        else:
            raise ConfigError(refusal(key, entry))
    return out, notes


def refusal(key: str, entry: Key) -> str:
    if entry.kind == "later":
        return f"{key} (in LLaMA-Factory: {entry.what}) is not in Lathe yet: it {entry.note}; remove it for now"
    return f"{key} (in LLaMA-Factory: {entry.what}) is not supported in Lathe: {entry.note}; remove it"


def _among(value: Any, choices: tuple[Any, ...]) -> bool:
    """YAML and command-line spellings alike: 'false' == False, '1e-6' == 1e-6, 'null' == None."""
    from lathe.config.coerce import coerce
    from lathe.errors import ConfigError as _CE

    for choice in choices:
        if choice is None:
            if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", "")):
                return True
            continue
        try:
            if coerce("", value, type(choice)) == choice:
                return True
        except _CE:
            continue
    return False


def describe(key: str, entry: Key) -> str:
    """One line of `lathe keys --from-llamafactory`."""
    if entry.kind == "same":
        return "supported, same name"
    if entry.kind == "alias":
        return f"-> {entry.to}" + (f" ({entry.note})" if entry.note else "")
    if entry.kind == "accepted":
        return "accepted, no effect here: " + entry.note
    if entry.kind == "later":
        return f"not yet ({entry.what}): {entry.note}"
    return f"not supported ({entry.what}): {entry.note}"
