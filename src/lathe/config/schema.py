"""The typed config tree.

Users write one flat YAML file with the key names they know from LLaMA-Factory and
`transformers.TrainingArguments`; each key belongs to exactly one section below.
Keys that are not Lathe's own but are `TrainingArguments` fields land in
`TrainConfig.extra` and are passed through unchanged (typed against transformers'
own field types when the config is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str, method: str | tuple[str, ...] | None = None,
       stage: str | tuple[str, ...] | None = None) -> Any:
    """A field with a help text (`lathe keys`); `method`: the finetuning_type(s) it belongs to
    (`lathe methods` lists it there, and a check refuses it with another method); `stage`:
    likewise the stage(s) that read it."""
    methods = (method,) if isinstance(method, str) else method
    stages = (stage,) if isinstance(stage, str) else stage
    meta = {"help": help, **({"methods": methods} if methods else {}), **({"stages": stages} if stages else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str | None = _f(
        None, "Local folder or hub id of the base model; `lathe:demo` is the embedded tiny model."
    )
    adapter_name_or_path: list[str] | None = _f(
        None, "Adapter folder(s) to load on top of the base model (comma-separated)."
    )
    trust_remote_code: bool = _f(False, "Allow code shipped with a hub model to run.")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Weight dtype: auto picks float32 on CPU, bfloat16/float16 for LoRA on GPU."
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "fa3"] = _f(
        "auto", "Attention kernel: auto (sdpa where the model has it), disabled (eager), sdpa, "
        "fa2 / fa3 (FlashAttention 2 / 3: a CUDA GPU and the flash-attn package; else sdpa, said)."
    )
    quantization_bit: int | None = _f(
        None, "QLoRA: load the base model quantized to 4 or 8 bits (bitsandbytes) and train a LoRA "
        "on it; chat, eval and predict load it the same way."
    )
    quantization_method: Literal["bnb"] = _f("bnb", "How the base is quantized: bnb (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type: nf4 (normal float) or fp4.")
    double_quantization: bool = _f(True, "4-bit: also quantize the quantization constants (saves "
                                   "about 0.4 bits per weight).")
    cache_dir: str | None = _f(None, "Where hub downloads are cached.")
    model_revision: str = _f("main", "Hub revision (branch, tag or commit) of the model.")
    use_modelscope_hub: bool = _f(False, "Read model ids from ModelScope (as modelscope:org/name does; also "
                                  "USE_MODELSCOPE_HUB=1); needs pip install 'lathe[modelscope]'.")


@dataclass(frozen=True)
class DataConfig:
    dataset: list[str] | None = _f(None, "Dataset name(s) from dataset_info.json (comma-separated).")
    dataset_dir: str = _f("data", "Folder holding dataset_info.json and the data files.")
    template: str = _f("default", "Chat template used to render conversations.")
    cutoff_len: int = _f(1024, "Maximum tokens per example after rendering.")
    max_samples: int | None = _f(None, "Keep at most this many rows of each dataset.")
    val_size: float = _f(0.0, "Validation split: a fraction in (0, 1) or a row count >= 1.")
    eval_dataset: list[str] | None = _f(None, "Dataset name(s) used only for evaluation.")
    test_size: float = _f(0.0, "Test split, held out from dataset: a fraction in (0, 1) or a row count >= 1; "
                          "evaluated once, after training and model selection (test_results.json).")
    test_dataset: list[str] | None = _f(None, "Dataset name(s) used only as the test set (instead of test_size).")
    stratify: bool | None = _f(None, "Split by label (stage cls, one class per row): every split and fold keeps "
                               "the class shares of the data. Unset: folds are stratified for such "
                               "classifiers, val_size / test_size splits are not.")
    folds: int = _f(0, "k-fold cross-validation (lathe cv): the rows not in the test split, dealt into "
                    "this many folds; each run holds one out as its validation set.")
    fold: int | None = _f(None, "Which fold (1..folds) this run holds out (lathe cv sets it for each run; "
                          "lathe train runs that one fold).")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = _f(
        "concat", "How several datasets mix: concatenated, or interleaved until the first "
        "(under) or last (over) runs out."
    )
    interleave_probs: list[float] | None = _f(
        None, "Sampling probability of each dataset when interleaving (comma-separated)."
    )
    streaming: bool = _f(False, "Read data lazily (larger than memory); needs max_steps.")
    preprocessing_num_workers: int | None = _f(None, "Processes for tokenization.")
    preprocessing_batch_size: int = _f(1000, "Rows per batch in tokenization.")
    overwrite_cache: bool = _f(False, "Redo tokenization instead of using the cached result.")
    train_on_prompt: bool = _f(False, "Also train on prompt tokens (normally masked).")
    train_on_last_turn_only: bool = _f(False, "Train only the last assistant turn.")
    packing: bool = _f(
        False, "Pack examples into rows of cutoff_len; attention never crosses examples."
    )
    padding_free: bool | None = _f(
        None, "Batches without padding: the same examples per step, side by side in a row with "
        "restarting position ids (attention never crosses them), the same loss. Unset: on where the "
        "model keeps them apart (a probe decides, as for packing) and the method allows; true: "
        "required; false: padded batches. sft, dpo and rm (each side of the pairs in rows of its own), "
        "kto (its rows, then their KL rows).",
        stage=("sft", "dpo", "kto", "rm"))
    strip_html: bool = _f(False, "Cleaning: remove HTML tags from text.")
    strip_urls: bool = _f(False, "Cleaning: remove URLs from text.")
    normalize_whitespace: bool = _f(False, "Cleaning: collapse runs of spaces and blank lines.")
    min_response_chars: int = _f(0, "Cleaning: drop rows whose response is shorter than this.")
    dedup: bool = _f(False, "Cleaning: drop exact duplicate rows.")
    lowercase: bool = _f(False, "Text preparation: lower-case the text (every split).")
    unify_punctuation: bool = _f(False, "Text preparation: full-width to half-width, Chinese and curly quotes, "
                                 "dashes and ellipses to ASCII (every split).")
    remove_stopwords: bool = _f(False, "Text preparation: drop English and Chinese stop words (small built-in "
                                "lists; Chinese split with jieba).")
    stem: bool = _f(False, "Text preparation: English words to their stems (Snowball).")
    augment: list[str] | None = _f(None, "Augmentation of training rows only: swap, delete, insert, synonym "
                                   "(comma-separated), applied to a copy of a row's input text.")
    augment_ratio: float = _f(1.0, "Augmented copies per training row (0.5: every other row gets one).")
    augment_strength: float = _f(0.1, "Share of a text's words each augmentation operation changes (at least one).")
    augment_synonyms: str | None = _f(None, "A text file of synonym groups, one group per line (for synonym, "
                                      "and for insert).")


# Augmentation (data keys augment ...): its operations, and the stages with input text to change
# apart from what they learn (a classifier's text, a seq2seq source, user turns).
AUGMENT_OPS = ("swap", "delete", "insert", "synonym")
AUGMENTABLE_STAGES = ("sft", "rm", "dpo", "kto", "cls", "seq2seq")

_LORA = ("lora", "adalora")  # AdaLoRA shares LoRA's target, alpha and dropout


@dataclass(frozen=True)
class FinetuneConfig:
    stage: str = _f("sft", "Training stage: pt, sft, rm, dpo, kto, ppo; or a task: cls (sequence "
                    "classification and regression), tagging (token classification, e.g. NER), seq2seq (an "
                    "encoder-decoder such as T5 or BART: source -> target), qa (extractive question "
                    "answering: an answer span in a context), embed (a sentence encoder for search).")
    finetuning_type: Literal["lora", "full", "freeze", "ia3", "prefix", "ptuning", "prompt", "adalora"] = _f(
        "lora", "What is trained (one module each in lathe.model.methods; `lathe methods` lists them)."
    )
    quantization_aware_training: bool = _f(
        False, "QAT: train on the weights (and activations) quantization_scheme will round them to, then "
        "save the float model and its quantized form in output_dir/quantized (with a report)."
    )
    lora_rank: int = _f(8, "LoRA rank r.", method="lora")
    lora_alpha: float | None = _f(None, "LoRA scaling alpha (default 2 x lora_rank).", method=_LORA)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.", method=_LORA)
    lora_target: list[str] = _f(
        ["all"], "Modules that get LoRA: `all` (every linear layer but the head) or names.", method=_LORA
    )
    use_dora: bool = _f(False, "LoRA: DoRA (weight-decomposed LoRA: a trained magnitude per output "
                        "feature beside the low-rank direction).", method="lora")
    use_rslora: bool = _f(False, "LoRA: rank-stabilised scaling lora_alpha / sqrt(r) instead of "
                          "lora_alpha / r (keeps high ranks learning).", method="lora")
    additional_target: list[str] | None = _f(
        None, "LoRA: modules trained in full beside the adapter and saved with it (e.g. "
        "embed_tokens,lm_head after adding tokens).", method="lora"
    )
    loraplus_lr_ratio: float | None = _f(
        None, "LoRA+: the B matrices learn this many times faster than A (e.g. 16); its own "
        "optimizer parameter groups.", method="lora"
    )
    loraplus_lr_embedding: float = _f(
        1e-6, "LoRA+: learning rate of LoRA on embedding layers.", method="lora"
    )
    pissa_init: bool = _f(False, "LoRA: PiSSA initialisation (A and B from the principal singular "
                          "vectors of each weight; the rest stays in the base).", method="lora")
    pissa_iter: int = _f(16, "PiSSA: fast-SVD iterations (-1: exact SVD, slow on big layers).",
                         method="lora")
    pissa_convert: bool | None = _f(
        None, "PiSSA: save the adapter converted to a plain LoRA of the original base (default "
        "and only choice: the run does not keep PiSSA's residual base).", method="lora"
    )
    create_new_adapter: bool = _f(
        False, "With adapter_name_or_path: merge all of them into the base and train a fresh "
        "adapter (default: train the last one further).", method="lora"
    )
    adalora_init_r: int = _f(12, "AdaLoRA: starting rank of every layer.", method="adalora")
    adalora_target_r: int = _f(8, "AdaLoRA: average rank the budget shrinks to.", method="adalora")
    adalora_tinit: int | None = _f(None, "AdaLoRA: steps before ranks start to shrink (default: "
                                   "10% of the steps).", method="adalora")
    adalora_tfinal: int | None = _f(None, "AdaLoRA: last steps trained at the final ranks "
                                    "(default: 20% of the steps).", method="adalora")
    adalora_deltaT: int = _f(1, "AdaLoRA: steps between two budget reallocations.", method="adalora")
    adalora_orth_reg_weight: float = _f(0.5, "AdaLoRA: weight of the orthogonality penalty on A "
                                        "and B.", method="adalora")
    num_virtual_tokens: int = _f(20, "Prefix / P-tuning / prompt tuning: how many virtual tokens "
                                 "are learned.", method=("prefix", "ptuning", "prompt"))
    prefix_projection: bool = _f(False, "Prefix tuning: learn the prefix through an MLP "
                                 "(reparameterisation) instead of directly.", method="prefix")
    encoder_hidden_size: int | None = _f(
        None, "Prefix (with prefix_projection) / P-tuning: hidden size of the prompt encoder "
        "(default: the model's hidden size).", method=("prefix", "ptuning")
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = _f(
        "MLP", "P-tuning: the prompt encoder, MLP or LSTM.", method="ptuning"
    )
    prompt_tuning_init_text: str | None = _f(
        None, "Prompt tuning: initialise the virtual tokens from this text's embeddings (repeated "
        "to num_virtual_tokens); default: embeddings of random vocabulary tokens.", method="prompt"
    )
    ia3_target: list[str] = _f(
        ["auto"], "IA3: modules whose activations get a learned scale: auto (peft's choice for the "
        "architecture, e.g. k_proj,v_proj,down_proj for Llama), all (every linear layer) or names.",
        method="ia3"
    )
    ia3_feedforward: list[str] | None = _f(
        None, "IA3: which of ia3_target are feed-forward layers (their inputs are scaled, not their "
        "outputs); default: the architecture's, as peft knows them.", method="ia3"
    )
    freeze_trainable_layers: int = _f(
        2, "freeze: train the last N blocks (negative: the first N).", method="freeze"
    )
    freeze_trainable_modules: list[str] = _f(
        ["all"], "freeze: which modules inside the trainable blocks (e.g. mlp,self_attn).", method="freeze"
    )
    freeze_extra_modules: list[str] | None = _f(
        None, "freeze: modules outside the blocks that also train (e.g. embed_tokens,norm).", method="freeze"
    )
    plot_loss: bool = _f(False, "Save training_loss.png (and training_eval_loss.png).")


@dataclass(frozen=True)
class AlignConfig:
    """Preference and RL stages (rm, dpo, kto, ppo); names as in LLaMA-Factory."""

    pref_beta: float = _f(0.1, "dpo/kto: beta, the strength of the pull towards the reference policy.")
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = _f(
        "sigmoid", "dpo: the preference loss (sigmoid = DPO; orpo and simpo need no reference model)."
    )
    pref_ftx: float = _f(0.0, "dpo: weight of an SFT loss on the chosen replies added to the loss.")
    pref_label_smoothing: float = _f(0.0, "dpo (sigmoid): robust DPO label smoothing in [0, 0.5).")
    simpo_gamma: float = _f(0.5, "simpo: the target reward margin.")
    pref_split_backward: bool = _f(
        True, "dpo: chosen and rejected replies go forward and backward one after the other, so "
        "activations are held for one side only (about 12% more compute); false: one joint pass."
    )
    kto_chosen_weight: float = _f(1.0, "kto: weight of desirable examples in the loss.")
    kto_rejected_weight: float = _f(1.0, "kto: weight of undesirable examples in the loss.")
    ref_model: str | None = _f(
        None, "dpo/kto/ppo with full tuning: the reference model folder (default: the starting model)."
    )
    reward_model: str | None = _f(None, "ppo: the run directory of an rm stage (adapter or full).")
    ppo_epochs: int = _f(4, "ppo: optimisation epochs over each batch of rollouts.")
    ppo_buffer_size: int = _f(1, "ppo: mini-batches of rollouts collected before optimising.")
    ppo_target: float | None = _f(
        6.0, "ppo: target KL for the adaptive KL controller (null: fixed coefficient)."
    )
    ppo_init_kl_coef: float = _f(0.2, "ppo: initial coefficient of the KL penalty against the reference.")
    ppo_kl_horizon: int = _f(10000, "ppo: horizon of the adaptive KL controller, in rollouts.")
    ppo_cliprange: float = _f(0.2, "ppo: clip range of the policy ratio.")
    ppo_cliprange_value: float = _f(0.2, "ppo: clip range of the value function.")
    ppo_vf_coef: float = _f(0.1, "ppo: weight of the value loss.")
    ppo_gamma: float = _f(1.0, "ppo: discount factor.")
    ppo_lam: float = _f(0.95, "ppo: GAE lambda.")
    ppo_score_norm: bool = _f(False, "ppo: normalise rewards with running mean and std.")
    ppo_whiten_rewards: bool = _f(False, "ppo: whiten the per-token rewards of each batch.")


_LABELLED = ("cls", "tagging")


@dataclass(frozen=True)
class TaskConfig:
    """Task stages (classification, ...): what the labels are and how rows become inputs."""

    problem_type: Literal["auto", "single_label_classification", "multi_label_classification",
                          "regression"] = _f(
        "auto", "cls: one label per row, several (a list per row), or a number (regression: MSE "
        "loss). auto: a list means multi-label, numbers with decimals mean regression, else "
        "single-label.", stage="cls")
    label_names: list[str] | None = _f(
        None, "The classes (tagging: the tags) in id order (comma-separated); default: the labels "
        "found in the training data, sorted. Integer labels are then ids into this list.", stage=_LABELLED)
    num_labels: int | None = _f(
        None, "How many classes the head has (checked against the data; default: from the data "
        "or label_names).", stage=_LABELLED)
    label_all_tokens: bool = _f(
        False, "tagging: also train every later piece of a word split into several tokens (a B- tag "
        "becomes I- there); default: only the first piece, the rest ignored. Scores stay per word.",
        stage="tagging")
    max_target_length: int = _f(
        128, "seq2seq: most tokens of a target text (cutoff_len bounds the source).", stage="seq2seq")
    source_prefix: str | None = _f(
        None, "seq2seq: text put before every source, e.g. 'summarize: ' or 'translate English to "
        "German: ' for T5.", stage="seq2seq")
    doc_stride: int | None = _f(
        None, "qa: a context longer than cutoff_len is read in windows that overlap by this many "
        "tokens (the answer is searched in each); default: a quarter of cutoff_len, at most 128.",
        stage="qa")
    max_answer_length: int = _f(30, "qa: the longest answer span considered, in tokens.", stage="qa")
    pooling: Literal["auto", "mean", "cls", "last"] = _f(
        "auto", "embed: how token vectors become one text vector: mean (over real tokens), cls (the "
        "first token), last (the last real token); auto: mean for encoders (BERT ...), last for "
        "decoders (Llama, Qwen ...).", stage="embed")
    embed_temperature: float = _f(
        0.05, "embed: temperature of the contrastive loss (cosine similarities are divided by it).",
        stage="embed")


@dataclass(frozen=True)
class GenerateConfig:
    """How text is generated (ppo rollouts, predict, chat)."""

    max_new_tokens: int = _f(64, "Most tokens generated per reply.")
    do_sample: bool = _f(True, "Sample (true) or decode greedily / with beams (false).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this probability.")
    top_k: int = _f(0, "Sample from the k most likely tokens only (0: no limit).")
    num_beams: int = _f(1, "Beam search width (1: no beam search).")
    repetition_penalty: float = _f(1.0, "Penalty for repeating tokens (1.0: none).")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str | None = _f(None, "Run directory for weights, logs and the resolved config.")
    overwrite_output_dir: bool = _f(False, "Replace an existing, non-empty output_dir.")
    resume_from_checkpoint: bool | str | None = _f(
        None, "true: resume from the latest checkpoint in output_dir; or a checkpoint path."
    )
    do_train: bool = _f(True, "Train.")
    do_eval: bool = _f(False, "Evaluate on the validation split after training.")
    do_predict: bool = _f(False, "After training, predict on the eval set (see predict_with_generate).")
    predict_with_generate: bool = _f(
        False, "do_predict generates a reply for every eval row and scores it (BLEU-4, ROUGE-1/2/L)."
    )
    per_device_train_batch_size: int = _f(8, "Batch size per device for training.")
    fused_loss: bool | None = _f(
        None, "pt / sft (and dpo / kto's log-probs): the output layer and the cross-entropy fused, a chunk "
        "of tokens at a time, so the batch's logits never exist whole (the same loss). Unset: on where a "
        "probe finds the model's own loss reproduced; true: required; false: the model's own loss.",
        stage=("pt", "sft", "dpo", "kto"))
    per_device_eval_batch_size: int = _f(8, "Batch size per device for evaluation.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    num_train_epochs: float = _f(3.0, "Epochs over the training set.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides epochs).")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
        "warmup_stable_decay", "greedy",
    ] = _f("linear", "Learning-rate schedule (transformers' SchedulerType names).")
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up the learning rate.")
    warmup_steps: int = _f(0, "Warm-up steps (wins over warmup_ratio when > 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    bf16: bool = _f(False, "bfloat16 mixed precision.")
    fp16: bool = _f(False, "float16 mixed precision.")
    gradient_checkpointing: bool | None = _f(
        None, "Recompute activations in the backward pass to save memory (about a third more compute). "
        "Unset: on only where lathe plan's estimate of the run does not fit the device's memory "
        "(device_memory) without it; the run summary says which and why. true / false: as set.")
    device_memory: float | None = _f(
        None, "GiB of memory one device may use (a shared GPU, a container's limit; on CPU the RAM of "
        "each process). Unset: the device's total. lathe plan and the gradient_checkpointing decision "
        "plan against it.")
    seed: int = _f(42, "Random seed.")
    logging_steps: int = _f(10, "Log every N optimizer steps.")
    save_steps: int = _f(500, "Checkpoint every N optimizer steps.")
    save_total_limit: int | None = _f(None, "Keep at most N checkpoints.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = _f(
        None, "When to evaluate (default: every save_steps when there is a validation split)."
    )
    eval_steps: int | None = _f(None, "Evaluate every N steps (default: save_steps).")
    early_stopping_steps: int | None = _f(
        None, "Stop when metric_for_best_model has not improved for this many evaluations."
    )
    nproc_per_node: int = _f(1, "Processes to start on this machine (one per GPU; CPU processes without one): "
                             "Lathe starts torchrun itself. 1: this process alone, or as a launcher started it.")
    report_to: list[str] = _f(["none"], "none, tensorboard, wandb, mlflow, ... (comma-separated; "
                              "each needs its package installed).")
    extra: dict[str, Any] = _f({}, "Other transformers.TrainingArguments fields, passed through.")


@dataclass(frozen=True)
class ExportConfig:
    """`lathe export`: merge adapters into the base model, save, verify."""

    export_dir: str | None = _f(None, "Folder the merged model is written to (must not hold files).")
    export_size: int = _f(5, "Largest weight shard, in GB.")
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "dtype of the exported weights (auto: the dtype the base checkpoint was saved in)."
    )
    export_legacy_format: bool = _f(False, "Write pytorch_model*.bin instead of safetensors.")
    export_hub_model_id: str | None = _f(None, "Also push the export to this hub repo (needs network).")
    export_verify: bool = _f(True, "Reload the export and check its logits and chat template.")
    export_merge: bool | None = _f(
        None, "Merge the last adapter into the weights (default: when its method can; prefix, "
        "ptuning and prompt cannot). false writes the base with the adapter in adapter/ beside it."
    )


@dataclass(frozen=True)
class BenchConfig:
    """`lathe eval`: multiple-choice benchmarks in the MMLU / C-Eval / CMMLU layout."""

    task: str | None = _f(None, "Benchmark folder name under task_dir, optionally _split (e.g. mmlu_test).")
    task_dir: str = _f("evaluation", "Folder holding the benchmark folders.")
    n_shot: int = _f(5, "Few-shot examples taken from the dev split.")
    lang: Literal["en", "zh"] = _f("en", "Language of the prompt wording.")
    save_dir: str | None = _f(None, "Folder results.json is written to (must not hold files).")


@dataclass(frozen=True)
class QuantizeConfig:
    """`lathe quantize`: a trained model -> a quantized model folder and a report."""

    quantization_scheme: Literal["int8_dynamic", "int8_static", "int8_weight_only", "int4_weight_only"] = _f(
        "int8_dynamic", "int8_dynamic (int8 weights, activations quantized per call; no data), int8_static "
        "(activations too, at ranges calibrated on calibration_dataset), int8_weight_only, int4_weight_only "
        "(groups of quantization_group_size)."
    )
    quantization_skip_modules: list[str] | None = _f(
        None, "Layers kept in float (names, dotted tails such as classifier or lm_head, or globs; comma-separated)."
    )
    quantization_keep_float: float = _f(
        0.0, "Mixed precision: keep this fraction of the layers in float, the ones whose quantization "
        "changes the loss on the calibration rows most (a per-layer sensitivity scan, saved as a table)."
    )
    quantize_embeddings: bool = _f(True, "Also store embedding tables as int8 rows.")
    quantization_group_size: int = _f(32, "int4_weight_only: weights per scale and zero.")
    calibration_dataset: list[str] | None = _f(
        None, "Dataset(s) from dataset_info.json whose rows calibrate int8_static and the sensitivity scan, "
        "rendered as the run was trained (template, cutoff_len)."
    )
    calibration_samples: int = _f(128, "Calibration rows to use (the dataset must hold at least this many).")
    quantize_report: bool = _f(
        True, "Measure the float and quantized models side by side (size, memory, latency, quality on "
        "eval_dataset) into quantize_report.json, a table and a chart."
    )
    quantize_compare: list[str] | None = _f(
        None, "Other quantized model folders (a QAT run's, another scheme's) measured in the same report."
    )
    benchmark_repeats: int = _f(5, "Timed runs per latency figure (the median is reported, after a warm-up); "
                              "0: no model is timed (size on disk and quality only).")


# The quantization schemes quantization_aware_training can train for (int8_static fixes its
# activation ranges by calibration after training).
QAT_SCHEMES: tuple[str, ...] = ("int8_dynamic", "int8_weight_only", "int4_weight_only")

# Stage names; each has a recipe module `lathe.recipes.<name>` (a test keeps them in step).
STAGES: tuple[str, ...] = ("pt", "sft", "rm", "dpo", "kto", "ppo", "cls", "tagging", "seq2seq", "qa", "embed")
# Stages that train a task head instead of a language model (lathe.model.load.TASKS names
# the model class of each).
TASK_STAGES: tuple[str, ...] = ("cls", "tagging", "seq2seq", "qa", "embed")

@dataclass(frozen=True)
class SelectionConfig:
    """Choosing the model: `lathe cv` (k-fold cross-validation; folds and fold are data keys) and
    `lathe tune` (hyperparameter search on Optuna)."""

    cv_retrain: bool = _f(False, "lathe cv: after the folds, train once more on every row but the test split "
                          "(output_dir/full), the model to keep; its test set is evaluated then.")
    cv_parallel: int = _f(1, "lathe cv: folds run at once, each in a process of its own with its share of the "
                          "CPU threads (1: one after the other, in this process).")
    search_space: dict[str, Any] | None = _f(
        None, "lathe tune: config keys to search, each {type: loguniform|uniform|float|int|categorical, low, "
        "high (log, step) | values}.")
    n_trials: int = _f(8, "lathe tune: trials in the study (a resumed study counts the finished ones).")
    tune_timeout: float | None = _f(None, "lathe tune: stop starting trials after this many seconds.")
    sampler: Literal["tpe", "random", "grid"] = _f("tpe", "lathe tune: how trial values are drawn (Optuna's "
                                                   "TPE, random, or every combination of a grid).")
    pruner: Literal["median", "none"] = _f("median", "lathe tune: stop a trial whose validation metric is worse "
                                           "than the median of earlier trials at the same step.")
    tune_metric: str = _f("eval_loss", "lathe tune: the validation metric trials are compared on (eval_loss, "
                          "eval_accuracy, eval_f1_macro ...).")
    tune_direction: Literal["auto", "minimize", "maximize"] = _f(
        "auto", "lathe tune: auto minimizes losses, perplexity and errors and maximizes the rest.")
    keep_best: int = _f(1, "lathe tune: trials whose weights are kept (the best ones); the others keep their "
                        "config, metrics and logs.")
    resume: bool = _f(False, "lathe tune: continue the study in output_dir (study.db) without repeating "
                      "finished trials.")


@dataclass(frozen=True)
class ServeConfig:
    """`lathe api`: an OpenAI-compatible server for a run directory, an export or a quantized model."""

    host: str = _f("127.0.0.1", "Address the server listens on (0.0.0.0: every network interface).")
    port: int = _f(8000, "Port the server listens on.")
    api_key: str | None = _f(None, "Key clients must send (Authorization: Bearer KEY) on every route but "
                             "/health; unset: no key is asked for.")
    served_model_name: str = _f("lathe", "The model name clients ask for (GET /v1/models lists it).")
    infer_backend: Literal["huggingface", "vllm"] = _f(
        "huggingface", "huggingface: Lathe's engine on transformers (CPU or GPU); vllm: vLLM's engine (a GPU "
        "machine with vllm installed).")
    max_batch_size: int = _f(32, "Dynamic batching: replies decoded together in one generate (1: one at a time).")
    batch_wait_ms: float = _f(10.0, "How long the first request of a batch waits for others to join it.")
    max_queue: int = _f(256, "Replies waiting or being generated before new requests get 429 (Retry-After).")
    request_timeout: float = _f(600.0, "Seconds a request may take, waiting included, before it ends with 504.")
    max_request_bytes: int = _f(2_000_000, "Largest request body; bigger ones get 413.")
    max_tokens_limit: int = _f(4096, "Most tokens one reply may ask for (max_tokens); above it: 400.")
    max_n: int = _f(8, "Most choices one request may ask for (n).")
    cors_origins: list[str] | None = _f(None, "Web origins allowed to call the API from a browser (CORS); unset: "
                                        "none (CORS off).")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "finetune": FinetuneConfig,
    "align": AlignConfig,
    "task": TaskConfig,
    "generate": GenerateConfig,
    "train": TrainConfig,
    "export": ExportConfig,
    "bench": BenchConfig,
    "quantize": QuantizeConfig,
    "selection": SelectionConfig,
    "serve": ServeConfig,
}

# What a config is loaded for: `lathe <command> cfg.yaml`; checks declare which they serve.
COMMANDS: tuple[str, ...] = ("train", "export", "chat", "eval", "quantize", "api")


@dataclass(frozen=True)
class LatheConfig:
    """The resolved config: defaults < file < command line, validated."""

    model: ModelConfig
    data: DataConfig
    finetune: FinetuneConfig
    align: AlignConfig
    generate: GenerateConfig
    train: TrainConfig
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    command: str = "train"  # what it was loaded for (decides which checks apply)
    explicit: frozenset[str] = frozenset()  # keys the user set (file or command line)
    source: str | None = None  # the file it came from, if any
    notes: tuple[str, ...] = ()  # remarks for the run summary (e.g. LLaMA-Factory keys with no effect)

    def is_set(self, key: str) -> bool:
        return key in self.explicit
