"""Cross-field rules, each a small named function registered in order.

A check receives the whole config and raises `ConfigError` with one line that says
what conflicts and how to fix it. Checks that need the model or the data live with
the model or data code; these need only the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lathe.config.schema import AUGMENT_OPS, AUGMENTABLE_STAGES, COMMANDS, STAGES, FinetuneConfig, LatheConfig
from lathe.errors import ConfigError, did_you_mean

Check = Callable[[LatheConfig], None]
CHECKS: list[tuple[str, Check, tuple[str, ...]]] = []
EVERY = COMMANDS


def check(fn: Check | None = None, *, commands: tuple[str, ...] = ("train",)) -> Any:
    """Register a check; by default it guards `lathe train` only (an export or chat
    config needs no dataset or output_dir)."""
    def register(f: Check) -> Check:
        CHECKS.append((f.__name__, f, commands))
        return f

    return register(fn) if fn is not None else register


def run_checks(cfg: LatheConfig) -> None:
    for _name, fn, commands in CHECKS:
        if cfg.command in commands:
            fn(cfg)


def _changed(section: object, prefix: str) -> list[str]:
    """Fields starting with `prefix` whose value differs from the default."""
    out = []
    for f in dataclasses.fields(section):
        if not f.name.startswith(prefix):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(section, f.name) != default:
            out.append(f.name)
    return out


def _verb(keys: list[str]) -> str:
    return "applies" if len(keys) == 1 else "apply"


def _pronoun(keys: list[str]) -> str:
    return "it" if len(keys) == 1 else "them"


@check(commands=EVERY)
def stage_is_known(cfg: LatheConfig) -> None:
    stage = cfg.finetune.stage
    if stage not in STAGES:
        raise ConfigError(
            f"stage: {stage} is not a known stage{did_you_mean(stage, STAGES)}; "
            f"known: {', '.join(STAGES)}"
        )


def method_keys(method: str) -> list[str]:
    """The FinetuneConfig keys that belong to `method` (schema metadata)."""
    return [f.name for f in dataclasses.fields(FinetuneConfig) if method in f.metadata.get("methods", ())]


@check(commands=EVERY)
def method_keys_fit_the_method(cfg: LatheConfig) -> None:
    """A key of one finetuning_type set while another is chosen would be silently ignored."""
    from lathe.model.methods import get_method

    ft: FinetuneConfig = cfg.finetune
    changed = _changed(ft, "")
    for f in dataclasses.fields(ft):
        owners = f.metadata.get("methods")
        if owners and ft.finetuning_type not in owners and f.name in changed:
            keys = [k for k in changed if k in {g.name for g in dataclasses.fields(ft)
                                                if g.metadata.get("methods") == owners}]
            said = " or ".join(owners)
            raise ConfigError(
                f"{', '.join(keys)} {_verb(keys)} only to finetuning_type: {said}, but finetuning_type "
                f"is {ft.finetuning_type}; remove {_pronoun(keys)} or set finetuning_type: {owners[0]}"
            )
    method = get_method(ft.finetuning_type)
    if cfg.command == "train" and ft.stage not in method.stages:
        raise ConfigError(f"finetuning_type: {ft.finetuning_type} with stage {ft.stage} is not in Lathe "
                          f"yet; it trains in stages {', '.join(method.stages)} (lora, freeze and full "
                          "train everywhere)")
    if ft.finetuning_type == "freeze" and ft.freeze_trainable_layers == 0:
        raise ConfigError(
            "freeze_trainable_layers: 0 trains nothing; use N > 0 for the last N blocks "
            "or -N for the first N"
        )


@check(commands=EVERY)
def task_keys_fit_the_stage(cfg: LatheConfig) -> None:
    """A task key (label_names, ...) with a stage that does not read it would be ignored."""
    stage = cfg.finetune.stage
    changed = _changed(cfg.task, "")
    for f in dataclasses.fields(cfg.task):
        owners = f.metadata.get("stages", ())
        if f.name in changed and stage not in owners:
            raise ConfigError(f"{f.name} applies only to stage {' or '.join(owners)}, but stage is {stage}; "
                              f"remove it or set stage: {owners[0]}")
    t = cfg.task
    if t.num_labels is not None and t.num_labels < 1:
        raise ConfigError(f"num_labels={t.num_labels} must be at least 1")
    if t.label_names is not None:
        if len(set(t.label_names)) != len(t.label_names):
            twice = next(n for n in t.label_names if t.label_names.count(n) > 1)
            raise ConfigError(f"label_names names {twice!r} twice; each class once, in id order")
        if t.num_labels is not None and t.num_labels != len(t.label_names):
            raise ConfigError(f"num_labels={t.num_labels} but label_names has {len(t.label_names)} names; "
                              "drop num_labels (label_names decides it)")
    if t.problem_type == "regression" and t.label_names:
        raise ConfigError("label_names with problem_type: regression: a regression predicts a number, "
                          "not a class; remove label_names")


@check(commands=EVERY)
def adapters_fit_the_method(cfg: LatheConfig) -> None:
    """adapter_name_or_path: what each folder was trained with (its adapter_config.json) must
    fit how it is used: merged into the base, trained further, or loaded to chat/eval/export."""
    adapters = cfg.model.adapter_name_or_path or []
    if not adapters:
        if cfg.finetune.create_new_adapter:
            raise ConfigError("create_new_adapter: true needs adapter_name_or_path (the adapters to merge "
                              "before a fresh one is trained); set it or remove create_new_adapter")
        return
    from lathe.model.methods import get_method, method_of_adapter

    ft = cfg.finetune
    training = cfg.command == "train"
    method = get_method(ft.finetuning_type)
    if training and not method.adapter:
        raise ConfigError(
            f"adapter_name_or_path needs an adapter method, not finetuning_type: {ft.finetuning_type} "
            "(to train a merged model in full, lathe export it and point model_name_or_path at the export)"
        )
    found = [(a, method_of_adapter(a)) for a in adapters]  # None: missing folders are reported at load
    # rm merges every given adapter into its backbone and trains a fresh one with its head
    fresh = training and (ft.create_new_adapter or ft.stage == "rm")
    merged = found if fresh else found[:-1]
    for folder, m in merged:
        if m is not None and not m.can_merge:
            raise ConfigError(f"adapter_name_or_path {folder} is a {m.name} adapter, which cannot be merged "
                              "into the base; it can only be the last adapter of adapter_name_or_path")
    last, last_method = found[-1]
    if training and not fresh and last_method is not None and last_method is not method:
        raise ConfigError(
            f"adapter_name_or_path {last} holds a {last_method.name} adapter (its adapter_config.json), "
            f"but finetuning_type is {ft.finetuning_type}; set finetuning_type: {last_method.name} to "
            "train it further" + (", or create_new_adapter: true to merge it and train a fresh LoRA"
                                  if last_method.can_merge and method.name == "lora" else "")
        )
    if training and not fresh and last_method is not None and last_method.name == "adalora":
        raise ConfigError(f"adapter_name_or_path {last} is an AdaLoRA adapter, whose rank schedule has ended; "
                          "train a fresh LoRA on it (finetuning_type: lora, create_new_adapter: true)")


@check(commands=EVERY)
def lora_variants_fit(cfg: LatheConfig) -> None:
    """PiSSA and LoRA+ where they work."""
    ft = cfg.finetune
    if ft.pissa_convert is not None and not ft.pissa_init:
        raise ConfigError("pissa_convert applies only with pissa_init: true (it turns a PiSSA adapter into a "
                          "plain LoRA); set pissa_init: true or remove pissa_convert")
    if ft.pissa_init:
        if ft.pissa_convert is False:
            raise ConfigError("pissa_convert: false would keep an adapter that fits only PiSSA's residual "
                              "base, which the run does not save; remove pissa_convert (Lathe converts it)")
        if ft.stage not in ("pt", "sft"):
            raise ConfigError(f"pissa_init with stage {ft.stage}: the reference or reward model would be "
                              "PiSSA's residual base, not yours; use PiSSA in pt or sft")
        if cfg.model.quantization_bit is not None:
            raise ConfigError("pissa_init with quantization_bit: PiSSA takes its components from "
                              "full-precision weights; remove one of them")
        if ft.pissa_iter < -1 or ft.pissa_iter == 0:
            raise ConfigError(f"pissa_iter={ft.pissa_iter}: use N >= 1 fast-SVD iterations, or -1 for the "
                              "exact SVD")
    if ft.loraplus_lr_ratio is not None:
        if ft.loraplus_lr_ratio <= 0:
            raise ConfigError(f"loraplus_lr_ratio={ft.loraplus_lr_ratio} must be positive (e.g. 16)")
        if ft.stage == "ppo":
            raise ConfigError("loraplus_lr_ratio with stage ppo: ppo builds its own optimizer; remove it")
    if ft.adalora_target_r > ft.adalora_init_r or ft.adalora_target_r < 1:
        raise ConfigError(f"adalora_target_r={ft.adalora_target_r} must be between 1 and adalora_init_r "
                          f"({ft.adalora_init_r}): the budget only shrinks")
    if ft.finetuning_type == "adalora" and cfg.command == "train" and cfg.train.max_steps > 0:
        from lathe.model.methods.adalora import schedule

        schedule(ft, cfg.train.max_steps)
    if ft.num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens={ft.num_virtual_tokens} must be at least 1")


@check
def packing_fits_the_method(cfg: LatheConfig) -> None:
    from lathe.model.methods import get_method

    if cfg.data.packing and not get_method(cfg.finetune.finetuning_type).packs:
        raise ConfigError(f"packing: true with finetuning_type: {cfg.finetune.finetuning_type}: peft drops "
                          "the position ids that keep packed examples apart once virtual tokens are "
                          "prepended; remove packing (or use lora)")


# The stages whose batches can go without padding (DataConfig.padding_free), and whose loss can
# be fused with the output layer (TrainConfig.fused_loss).
PADDING_FREE_STAGES = ("sft", "dpo", "kto", "rm")
FUSED_LOSS_STAGES = ("pt", "sft", "dpo", "kto")


@check
def fused_loss_fits(cfg: LatheConfig) -> None:
    if cfg.train.fused_loss and cfg.finetune.stage not in FUSED_LOSS_STAGES:
        raise ConfigError(f"fused_loss: true with stage {cfg.finetune.stage}: the fused loss is built for stages "
                          f"{', '.join(FUSED_LOSS_STAGES)}; remove fused_loss")


@check
def liger_kernel_fits(cfg: LatheConfig) -> None:
    """use_liger_kernel (a TrainingArguments key): Liger's kernels are Triton programs, CUDA only."""
    import importlib.util

    import torch

    if not cfg.train.extra.get("use_liger_kernel"):
        return
    if not torch.cuda.is_available():
        raise ConfigError("use_liger_kernel: true needs a CUDA GPU (Liger's kernels are Triton programs) and "
                          "this machine has none; remove it: Lathe's fused loss (fused_loss, on by default) "
                          "keeps the logits from being materialised here too")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("use_liger_kernel: true needs the liger-kernel package, which is not installed; "
                          "pip install liger-kernel (or remove use_liger_kernel)")


@check
def torch_compile_fits(cfg: LatheConfig) -> None:
    """torch_compile (TrainingArguments; its backend or mode set turns it on too): inductor, the
    default backend, writes C++ on CPU and Triton on a GPU, which need a compiler or triton. A
    run that asked for compilation and cannot have it stops here, before anything is loaded,
    rather than at its first step with the compiler's traceback."""
    import torch

    extra = cfg.train.extra
    if not (extra.get("torch_compile") or extra.get("torch_compile_backend") or extra.get("torch_compile_mode")):
        return
    if (extra.get("torch_compile_backend") or "inductor") != "inductor":
        return
    if torch.cuda.is_available() and not extra.get("use_cpu"):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("torch_compile: true compiles with inductor, which needs triton on a GPU, and triton "
                              "is not installed; pip install triton (the version your torch names), or remove "
                              "torch_compile")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # torch's InvalidCxxCompiler, or whatever the search stumbled on
        raise ConfigError("torch_compile: true compiles with inductor, which needs a C++ compiler on CPU, and none "
                          f"was found ({type(e).__name__}: {str(e).splitlines()[0][:120]}); install one "
                          "(apt install g++) or point CXX at it, or remove torch_compile") from None


@check
def padding_free_fits(cfg: LatheConfig) -> None:
    from lathe.model.methods import get_method

    if not cfg.data.padding_free:
        return
    stage, method = cfg.finetune.stage, cfg.finetune.finetuning_type
    if stage not in PADDING_FREE_STAGES:
        raise ConfigError(f"padding_free: true with stage {stage}: padding-free batches are built for stage "
                          f"{', '.join(PADDING_FREE_STAGES)}; remove padding_free")
    if not get_method(method).packs:
        raise ConfigError(f"padding_free: true with finetuning_type: {method}: peft drops the position ids "
                          "that keep the examples of a row apart once virtual tokens are prepended; remove "
                          "padding_free (or use lora)")


@check(commands=EVERY)
def lora_values_in_range(cfg: LatheConfig) -> None:
    ft = cfg.finetune
    if ft.lora_rank < 1:
        raise ConfigError(f"lora_rank={ft.lora_rank} must be at least 1")
    if not 0.0 <= ft.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={ft.lora_dropout} must be in [0, 1)")
    if not ft.lora_target:
        raise ConfigError("lora_target is empty; use `all` or module names such as q_proj,v_proj")


@check(commands=EVERY)
def model_is_given(cfg: LatheConfig) -> None:
    if not cfg.model.model_name_or_path:
        raise ConfigError(
            "model_name_or_path is missing; give a local folder, a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct, or lathe:demo for the embedded tiny model"
        )


@check
def dataset_is_given(cfg: LatheConfig) -> None:
    if cfg.data.dataset:
        return
    if cfg.train.do_train:
        raise ConfigError("dataset is missing; name one or more entries of dataset_info.json")
    if not cfg.data.eval_dataset:  # evaluate / predict only: the eval set is all it reads
        raise ConfigError("no data: with do_train: false name the rows to evaluate or predict on "
                          "in eval_dataset (or give dataset with val_size)")
    if cfg.data.streaming:
        raise ConfigError("streaming reads dataset, which is missing; set streaming: false to "
                          "evaluate or predict on eval_dataset alone")


@check
def output_dir_is_given(cfg: LatheConfig) -> None:
    if not cfg.train.output_dir:
        raise ConfigError("output_dir is missing; say where the run directory goes, e.g. runs/my-sft")


@check
def one_mixed_precision(cfg: LatheConfig) -> None:
    if cfg.train.bf16 and cfg.train.fp16:
        raise ConfigError("bf16 and fp16 are both true; choose one")


@check
def sizes_are_positive(cfg: LatheConfig) -> None:
    t, d = cfg.train, cfg.data
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{key}={getattr(t, key)} must be at least 1")
    if d.cutoff_len < 2:
        raise ConfigError(f"cutoff_len={d.cutoff_len} must be at least 2")
    if d.max_samples is not None and d.max_samples < 1:
        raise ConfigError(f"max_samples={d.max_samples} must be at least 1 (or null for all)")
    if t.learning_rate <= 0:
        raise ConfigError(f"learning_rate={t.learning_rate} must be positive")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs must be positive (or set max_steps)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio={t.warmup_ratio} must be in [0, 1)")


@check
def val_size_is_fraction_or_count(cfg: LatheConfig) -> None:
    v = cfg.data.val_size
    if v < 0 or (1.0 <= v and not float(v).is_integer()):
        raise ConfigError(
            f"val_size={v} must be a fraction in (0, 1) or a whole number of rows (>= 1)"
        )


def _has_eval_set(cfg: LatheConfig) -> bool:
    d = cfg.data
    return bool(d.val_size or d.eval_dataset or d.folds)


@check
def test_split_fits(cfg: LatheConfig) -> None:
    d = cfg.data
    v = d.test_size
    if v < 0 or (1.0 <= v and not float(v).is_integer()):
        raise ConfigError(f"test_size={v} must be a fraction in (0, 1) or a whole number of rows (>= 1)")
    if d.test_dataset and d.test_size:
        raise ConfigError("give either test_size (split off the training data) or test_dataset, not both")
    if 0 < d.val_size < 1 and 0 < d.test_size < 1 and d.val_size + d.test_size >= 1:
        raise ConfigError(f"val_size={d.val_size:g} + test_size={d.test_size:g} = {d.val_size + d.test_size:g} "
                          "leaves nothing to train on; together they must stay below 1 (e.g. 0.1 and 0.1)")
    if (d.test_size or d.test_dataset) and cfg.finetune.stage == "ppo":
        raise ConfigError("stage ppo has no evaluation pass to run a test set through; remove test_size / "
                          "test_dataset (score the policy with lathe eval or predict afterwards)")
    if d.streaming and 0 < d.test_size < 1:
        raise ConfigError(f"test_size={d.test_size} is a fraction, but a stream has no known length; "
                          "give a row count (test_size: 500) or a test_dataset")
    if d.test_size and not d.dataset:
        raise ConfigError("test_size splits the training rows, and no dataset is given; set dataset or "
                          "use test_dataset")


@check
def folds_fit(cfg: LatheConfig) -> None:
    d = cfg.data
    if d.folds == 1 or d.folds < 0:
        raise ConfigError(f"folds={d.folds} must be at least 2 (5 or 10 are usual), or 0 for no cross-validation")
    if d.fold is not None and not d.folds:
        raise ConfigError(f"fold={d.fold} picks one of the folds, but folds is not set; set folds (e.g. folds=5)")
    if d.fold is not None and not 1 <= d.fold <= d.folds:
        raise ConfigError(f"fold={d.fold} must be between 1 and folds={d.folds}")
    if not d.folds:
        return
    if d.val_size or d.eval_dataset:
        key = "val_size" if d.val_size else "eval_dataset"
        raise ConfigError(f"with folds, each run's held-out fold is its validation set; remove {key}")
    if d.streaming:
        raise ConfigError("folds deal every row into folds, and a stream is read once; turn streaming off")
    if cfg.finetune.stage == "ppo":
        raise ConfigError("stage ppo has no evaluation pass to score a fold with; cross-validate the reward "
                          "model (stage rm) instead")


@check
def cv_keys_fit(cfg: LatheConfig) -> None:
    if cfg.selection.cv_parallel < 1:
        raise ConfigError(f"cv_parallel={cfg.selection.cv_parallel} must be at least 1 (folds run at once)")


@check
def text_preparation_fits(cfg: LatheConfig) -> None:
    d, stage = cfg.data, cfg.finetune.stage
    prep = [k for k in ("lowercase", "unify_punctuation", "remove_stopwords", "stem") if getattr(d, k)]
    if prep and stage == "qa":
        raise ConfigError(f"{', '.join(prep)}: stage qa finds answers by their character offsets in the "
                          "context, which changing the text would move; remove them")
    if d.remove_stopwords and stage == "tagging":
        raise ConfigError("remove_stopwords: stage tagging has a tag for every word, so no word can be dropped; "
                          "remove it (lowercase, unify_punctuation and stem work word by word)")
    if not d.augment:
        return
    unknown = [op for op in d.augment if op not in AUGMENT_OPS]
    if unknown:
        raise ConfigError(f"augment: {unknown[0]!r} is not an operation{did_you_mean(unknown[0], AUGMENT_OPS)}; "
                          f"choose from {', '.join(AUGMENT_OPS)}")
    if stage not in AUGMENTABLE_STAGES:
        raise ConfigError(f"augment: stage {stage} has no input text to change apart from what it learns "
                          f"(augmentation works for {', '.join(AUGMENTABLE_STAGES)}); remove augment")
    if "synonym" in d.augment and not d.augment_synonyms:
        raise ConfigError("augment: synonym needs augment_synonyms: a text file with one group of interchangeable "
                          "words per line")
    if d.augment_ratio <= 0:
        raise ConfigError(f"augment_ratio={d.augment_ratio} must be above 0 (copies per training row)")
    if not 0 < d.augment_strength <= 1:
        raise ConfigError(f"augment_strength={d.augment_strength} must be in (0, 1] (the share of words changed)")
    if d.streaming:
        raise ConfigError("augment: a stream is read once, in order; turn streaming off to augment")


@check
def stratify_fits(cfg: LatheConfig) -> None:
    if cfg.data.stratify and cfg.finetune.stage != "cls":
        raise ConfigError(f"stratify: true splits by class, and stage {cfg.finetune.stage} has no class per row "
                          "(stage cls has); remove stratify")


@check
def resume_or_overwrite(cfg: LatheConfig) -> None:
    if cfg.train.resume_from_checkpoint and cfg.train.overwrite_output_dir:
        raise ConfigError(
            "resume_from_checkpoint and overwrite_output_dir ask for opposite things "
            "(continue the run vs. replace it); keep one"
        )


@check
def something_to_do(cfg: LatheConfig) -> None:
    t = cfg.train
    if not t.do_train and not t.do_eval and not t.do_predict:
        raise ConfigError("do_train, do_eval and do_predict are all false; nothing to do")


@check
def eval_needs_a_split(cfg: LatheConfig) -> None:
    t = cfg.train
    if (t.do_eval or t.eval_strategy not in (None, "no")) and not _has_eval_set(cfg):
        raise ConfigError(
            "evaluation is asked for (do_eval / eval_strategy) but val_size is 0; "
            "set val_size (e.g. val_size: 0.1) or eval_dataset"
        )


@check
def streaming_needs_max_steps(cfg: LatheConfig) -> None:
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        raise ConfigError(
            "streaming: true needs max_steps (a stream has no known length, so epochs cannot "
            "be counted); set e.g. max_steps: 1000"
        )
    if cfg.data.streaming and 0 < cfg.data.val_size < 1:
        raise ConfigError(
            f"val_size={cfg.data.val_size} is a fraction, but a stream has no known length; "
            "give a row count (val_size: 500) or an eval_dataset"
        )


@check
def interleave_probs_fit(cfg: LatheConfig) -> None:
    d = cfg.data
    if d.interleave_probs is None:
        return
    if d.mix_strategy == "concat":
        raise ConfigError("interleave_probs needs mix_strategy: interleave_under or interleave_over")
    n = len(d.dataset or [])
    if len(d.interleave_probs) != n:
        raise ConfigError(
            f"interleave_probs has {len(d.interleave_probs)} values but dataset names {n}; "
            "give one probability per dataset"
        )
    if any(p < 0 for p in d.interleave_probs) or abs(sum(d.interleave_probs) - 1.0) > 1e-6:
        raise ConfigError(f"interleave_probs {d.interleave_probs} must be >= 0 and sum to 1")


@check
def eval_source_is_single(cfg: LatheConfig) -> None:
    if cfg.data.eval_dataset and cfg.data.val_size:
        raise ConfigError("give either val_size (split off the training data) or eval_dataset, not both")


@check
def packing_needs_a_known_length(cfg: LatheConfig) -> None:
    if cfg.data.packing and cfg.data.streaming:
        raise ConfigError(
            "packing: true cannot be combined with streaming: true (packing sorts the whole set "
            "by length); turn one of them off"
        )


# Which stages read each alignment key (the others would silently ignore it).
_ALIGN_STAGES = {
    "pref_beta": ("dpo", "kto"), "pref_loss": ("dpo",), "pref_ftx": ("dpo",),
    "pref_label_smoothing": ("dpo",), "simpo_gamma": ("dpo",),
    "pref_split_backward": ("dpo",),
    "kto_chosen_weight": ("kto",), "kto_rejected_weight": ("kto",),
    "ref_model": ("dpo", "kto", "ppo"), "reward_model": ("ppo",),
}


def align_stages(key: str) -> tuple[str, ...]:
    """The stages that read alignment key `key`."""
    return ("ppo",) if key.startswith("ppo_") else _ALIGN_STAGES[key]


@check
def align_keys_fit_the_stage(cfg: LatheConfig) -> None:
    stage = cfg.finetune.stage
    for key in _changed(cfg.align, ""):
        stages = align_stages(key)
        if stage not in stages:
            raise ConfigError(
                f"{key} applies only to stage {' or '.join(stages)}, but stage is {stage}; "
                f"remove it or set stage: {stages[0]}"
            )


@check
def ppo_needs_a_reward_model(cfg: LatheConfig) -> None:
    if cfg.finetune.stage == "ppo" and not cfg.align.reward_model:
        raise ConfigError(
            "stage ppo needs reward_model: the run directory of an rm stage "
            "(train one with stage: rm on preference data first)"
        )


@check
def align_values_in_range(cfg: LatheConfig) -> None:
    a = cfg.align
    if a.pref_beta <= 0:
        raise ConfigError(f"pref_beta={a.pref_beta} must be positive")
    if not 0.0 <= a.pref_label_smoothing < 0.5:
        raise ConfigError(f"pref_label_smoothing={a.pref_label_smoothing} must be in [0, 0.5)")
    if a.pref_label_smoothing and a.pref_loss != "sigmoid":
        raise ConfigError(f"pref_label_smoothing needs pref_loss: sigmoid (pref_loss is {a.pref_loss})")
    if a.pref_ftx < 0 or a.kto_chosen_weight <= 0 or a.kto_rejected_weight <= 0:
        raise ConfigError("pref_ftx must be >= 0 and kto_chosen_weight / kto_rejected_weight > 0")
    for key in ("ppo_epochs", "ppo_buffer_size", "ppo_kl_horizon"):
        if getattr(a, key) < 1:
            raise ConfigError(f"{key}={getattr(a, key)} must be at least 1")
    if a.ppo_target is not None and a.ppo_target <= 0:
        raise ConfigError(f"ppo_target={a.ppo_target} must be positive (or null for a fixed KL coefficient)")
    if not 0.0 <= a.ppo_lam <= 1.0 or not 0.0 <= a.ppo_gamma <= 1.0:
        raise ConfigError("ppo_gamma and ppo_lam must be in [0, 1]")


@check(commands=EVERY)
def generation_values_in_range(cfg: LatheConfig) -> None:
    g = cfg.generate
    if g.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={g.max_new_tokens} must be at least 1")
    if g.temperature <= 0:
        raise ConfigError(f"temperature={g.temperature} must be positive (set do_sample: false for greedy)")
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"top_p={g.top_p} must be in (0, 1]")
    if g.top_k < 0 or g.num_beams < 1 or g.repetition_penalty <= 0:
        raise ConfigError("top_k must be >= 0, num_beams >= 1 and repetition_penalty > 0")


@check
def predict_needs_an_eval_set(cfg: LatheConfig) -> None:
    t = cfg.train
    if (t.do_predict or t.predict_with_generate) and not _has_eval_set(cfg):
        key = "predict_with_generate" if t.predict_with_generate else "do_predict"
        raise ConfigError(
            f"{key} needs rows to predict on, but there is no eval set; "
            "set eval_dataset (or val_size, e.g. val_size: 0.1)"
        )


@check
def early_stopping_needs_evaluation(cfg: LatheConfig) -> None:
    t = cfg.train
    if t.early_stopping_steps is None:
        return
    if t.early_stopping_steps < 1:
        raise ConfigError(f"early_stopping_steps={t.early_stopping_steps} must be at least 1")
    if not _has_eval_set(cfg):
        raise ConfigError("early_stopping_steps needs an eval set to watch; set val_size or eval_dataset")
    if t.eval_strategy == "no":
        raise ConfigError("early_stopping_steps needs evaluations; remove eval_strategy: no")


@check(commands=("export",))
def export_dir_is_given(cfg: LatheConfig) -> None:
    if not cfg.export.export_dir:
        raise ConfigError("export_dir is missing; say where the merged model goes, e.g. export_dir: exports/my-model")
    if cfg.export.export_size < 1:
        raise ConfigError(f"export_size={cfg.export.export_size} must be at least 1 (GB per shard)")


@check(commands=("eval",))
def benchmark_is_given(cfg: LatheConfig) -> None:
    b = cfg.bench
    if not b.task:
        raise ConfigError("task is missing; name a benchmark folder under task_dir, e.g. task: lathe_bench_test")
    if b.n_shot < 0:
        raise ConfigError(f"n_shot={b.n_shot} must be 0 or more")


@check(commands=("api",))
def serve_keys_fit(cfg: LatheConfig) -> None:
    s = cfg.serve
    if not 0 < s.port < 65536:
        raise ConfigError(f"port={s.port} must be between 1 and 65535")
    for key in ("max_batch_size", "max_queue", "max_request_bytes", "max_tokens_limit", "max_n"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{key}={getattr(s, key)} must be at least 1")
    if s.batch_wait_ms < 0 or s.request_timeout <= 0:
        key = "batch_wait_ms" if s.batch_wait_ms < 0 else "request_timeout"
        raise ConfigError(f"{key}={getattr(s, key)} must be {'0 or more' if key == 'batch_wait_ms' else 'positive'}")
    if s.api_key is not None and not s.api_key.strip():
        raise ConfigError("api_key is empty; give a key clients must send, or remove api_key")


# report_to names transformers knows, and the package each needs.
_REPORTERS = {
    "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",),
    "dvclive": ("dvclive",), "codecarbon": ("codecarbon",), "azure_ml": ("azureml",),
    "dagshub": ("dagshub",), "flyte": ("flytekit",), "swanlab": ("swanlab",),
    "trackio": ("trackio",), "kubeflow": ("kubeflow",),
}


@check
def report_to_is_installed(cfg: LatheConfig) -> None:
    """Checked before anything is written: a logger whose package is missing would
    otherwise fail inside the Trainer, after the run directory exists."""
    import importlib.util

    names = cfg.train.report_to
    for name in names:
        if name in ("none", "all") and len(names) > 1:
            raise ConfigError(f"report_to: {name} cannot be combined with other loggers ({', '.join(names)})")
        if name in ("none", "all"):
            continue
        if name not in _REPORTERS:
            raise ConfigError(f"report_to: {name} is not a logger transformers knows"
                              f"{did_you_mean(name, _REPORTERS)}; known: none, all, {', '.join(_REPORTERS)}")
        packages = _REPORTERS[name]
        if not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(f"report_to: {name} needs the {packages[0]} package, which is not "
                              f"installed; pip install {packages[0]}, or use report_to: tensorboard or none")


@check(commands=EVERY)
def quantization_fits(cfg: LatheConfig) -> None:
    """QLoRA's keys: the bits bitsandbytes has, an adapter to train, the package installed."""
    import importlib.util

    m = cfg.model
    if m.quantization_bit is None:
        changed = _changed(m, "")
        keys = [k for k in ("quantization_type", "double_quantization", "quantization_method") if k in changed]
        if keys:
            raise ConfigError(f"{', '.join(keys)} {_verb(keys)} only with quantization_bit (4 or 8); "
                              f"set quantization_bit or remove {_pronoun(keys)}")
        return
    if m.quantization_bit not in (4, 8):
        raise ConfigError(f"quantization_bit: {m.quantization_bit} is not a width bitsandbytes has; "
                          "use 4 (QLoRA) or 8")
    if m.quantization_bit == 8 and "quantization_type" in _changed(m, "quantization_"):
        raise ConfigError("quantization_type applies to 4-bit only; remove it or set quantization_bit: 4")
    if cfg.command == "export":
        raise ConfigError("quantization_bit: lathe export merges the adapter into the full-precision "
                          "base (export_dtype picks its dtype); remove quantization_bit")
    from lathe.model.methods import get_method

    if cfg.command == "train" and not get_method(cfg.finetune.finetuning_type).quantized_base:
        raise ConfigError(f"quantization_bit needs finetuning_type: lora (QLoRA trains an adapter on "
                          f"the frozen quantized base; {cfg.finetune.finetuning_type} would update the "
                          "quantized weights themselves)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("quantization_bit needs the bitsandbytes package, which is not installed; "
                          "pip install bitsandbytes (or pip install 'lathe[qlora]')")


@check(commands=("quantize",))
def quantize_keys_fit(cfg: LatheConfig) -> None:
    """`lathe quantize`: where to write, the scheme's data, values in range."""
    q = cfg.quantize
    if not cfg.train.output_dir:
        raise ConfigError("lathe quantize needs output_dir: the folder the quantized model is written to")
    if not 0.0 <= q.quantization_keep_float < 1.0:
        raise ConfigError(f"quantization_keep_float: {q.quantization_keep_float} must be a fraction in [0, 1) "
                          "(e.g. 0.1 keeps the 10% most sensitive layers in float)")
    if q.calibration_samples < 1:
        raise ConfigError(f"calibration_samples: {q.calibration_samples} must be at least 1")
    if q.quantization_group_size < 2 or q.quantization_group_size % 2:
        raise ConfigError(f"quantization_group_size: {q.quantization_group_size} must be an even number >= 2 "
                          "(32, 64 or 128 are usual)")
    if q.benchmark_repeats < 0:
        raise ConfigError(f"benchmark_repeats: {q.benchmark_repeats} must be 0 (no timing) or more")
    needs = ("int8_static" if q.quantization_scheme == "int8_static" else
             "quantization_keep_float" if q.quantization_keep_float > 0 else None)
    if needs and not q.calibration_dataset:
        raise ConfigError(f"{needs} needs calibration rows: set calibration_dataset to a dataset of "
                          "dataset_info.json (and calibration_samples, default 128)")
    if _changed(q, "quantization_group_size") and q.quantization_scheme != "int4_weight_only":
        raise ConfigError(f"quantization_group_size applies to int4_weight_only only (quantization_scheme is "
                          f"{q.quantization_scheme}); remove it")


@check
def quantization_aware_training_fits(cfg: LatheConfig) -> None:
    """QAT: a scheme it can train for, a method whose result merges into weights, a stage with a
    Trainer; the quantize keys mean nothing in a train config without it."""
    q, ft = cfg.quantize, cfg.finetune
    changed = [k for k in _changed(q, "") if k not in ("quantize_report", "benchmark_repeats")]
    if not ft.quantization_aware_training:
        if changed:
            raise ConfigError(f"{', '.join(changed)} {_verb(changed)} for lathe quantize (or training with "
                              f"quantization_aware_training: true); remove {_pronoun(changed)} or set "
                              "quantization_aware_training: true")
        return
    from lathe.config.schema import QAT_SCHEMES
    from lathe.model.methods import get_method

    if q.quantization_scheme not in QAT_SCHEMES:
        raise ConfigError(f"quantization_aware_training trains for {', '.join(QAT_SCHEMES)}; "
                          f"quantization_scheme: {q.quantization_scheme} fixes activation ranges by calibration "
                          "after training: train with int8_dynamic, or quantize the finished run with lathe quantize")
    method = get_method(ft.finetuning_type)
    if not method.can_merge:
        raise ConfigError(f"quantization_aware_training needs weights to round, and finetuning_type: "
                          f"{ft.finetuning_type} trains virtual tokens instead (it cannot merge into the weights); "
                          "use lora, full or freeze")
    if cfg.model.quantization_bit is not None:
        raise ConfigError("quantization_aware_training and quantization_bit (QLoRA) both quantize the base: "
                          "choose one")
    if ft.stage == "ppo":
        raise ConfigError("quantization_aware_training works in the stages trained by a Trainer (pt, sft, rm, dpo, "
                          "kto and the task stages), not ppo's own loop; quantize the ppo run with lathe quantize")
    if q.quantization_keep_float > 0:
        raise ConfigError("quantization_keep_float (the sensitivity scan) runs in lathe quantize; with "
                          "quantization_aware_training name the layers to keep float in quantization_skip_modules")


@check
def engine_fits(cfg: LatheConfig) -> None:
    """deepspeed / fsdp / nproc_per_node: the file, the package, and what the run can do under them."""
    from lathe.distributed import check_engine

    check_engine(cfg)
