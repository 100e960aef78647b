"""The web UI's words in English and Chinese.

English labels and help texts of config keys come from the config schema (one source of
truth: `lathe keys` prints the same help); this module holds the Chinese for every key the
UI shows and every other word on the page, in both languages. A test checks that nothing the
page shows lacks either language.
"""

from __future__ import annotations

LANGS = ("en", "zh")

# Short English labels where the key's words read badly; the others are the key's words.
LABELS_EN = {
    "model_name_or_path": "Model", "adapter_name_or_path": "Adapters", "finetuning_type": "Method",
    "quantization_bit": "Quantize base (QLoRA bits)", "dataset_dir": "Data folder", "cutoff_len": "Cutoff length",
    "val_size": "Validation size", "per_device_train_batch_size": "Batch size", "num_train_epochs": "Epochs",
    "gradient_accumulation_steps": "Gradient accumulation", "lr_scheduler_type": "LR schedule",
    "max_grad_norm": "Max gradient norm", "bf16": "bf16 mixed precision", "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "lora_target": "LoRA target modules",
    "pref_beta": "Preference beta", "pref_loss": "Preference loss", "output_dir": "Output folder",
    "plot_loss": "Save loss plots", "task": "Benchmark", "task_dir": "Benchmark folder", "n_shot": "Shots",
    "lang": "Prompt language", "save_dir": "Results folder", "eval_dataset": "Evaluation dataset",
    "max_new_tokens": "Max new tokens", "do_sample": "Sample", "top_p": "Top-p", "export_dir": "Export folder",
    "export_dtype": "Export dtype", "export_size": "Shard size (GB)", "export_verify": "Verify the export",
    "quantization_scheme": "Quantization scheme", "calibration_dataset": "Calibration dataset",
    "per_device_eval_batch_size": "Eval batch size", "benchmark_repeats": "Timed runs",
}

# Chinese label and help text of every key a form shows.
KEYS_ZH: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("模型", "基座模型的本地文件夹或 Hub ID；`lathe:demo` 是内置的小模型；"
                                  "也可以是之前训练或导出的模型文件夹。"),
    "adapter_name_or_path": ("适配器", "在基座模型上加载的适配器文件夹（多个用逗号分隔）。"),
    "template": ("对话模板", "渲染对话所用的模板；选择模型后会根据分词器自动推荐。"),
    "finetuning_type": ("微调方法", "训练哪些参数：lora、full（全参数）、freeze（冻结）、ia3、prefix、"
                                "ptuning、prompt、adalora。"),
    "quantization_bit": ("基座量化位数（QLoRA）", "以 4 或 8 比特量化加载基座模型（bitsandbytes），在其上训练 LoRA。"),
    "stage": ("训练阶段", "pt（继续预训练）、sft（指令微调）、rm（奖励模型）、dpo、kto、ppo；"
              "或任务：cls（分类与回归）、tagging（序列标注，如 NER）、"
              "seq2seq（编码器-解码器）、qa（抽取式问答）、embed（检索用句向量）。"),
    "dataset_dir": ("数据文件夹", "存放 dataset_info.json 和数据文件的文件夹。"),
    "dataset": ("数据集", "dataset_info.json 中的数据集名称（多个用逗号分隔）。"),
    "cutoff_len": ("截断长度", "渲染后每条样本的最大 token 数。"),
    "max_samples": ("最大样本数", "每个数据集最多使用的行数。"),
    "val_size": ("验证集大小", "验证集划分：(0, 1) 之间的比例，或 >= 1 的行数。"),
    "packing": ("样本打包", "把样本打包成 cutoff_len 长的行；注意力不会跨越样本。"),
    "learning_rate": ("学习率", "学习率峰值。"),
    "num_train_epochs": ("训练轮数", "在训练集上训练的轮数（epoch）。"),
    "max_steps": ("最大步数", "训练到这么多优化步后停止（优先于训练轮数）；-1 表示不限制。"),
    "per_device_train_batch_size": ("批大小", "每个设备上的训练批大小。"),
    "per_device_eval_batch_size": ("评估批大小", "每个设备上的评估批大小。"),
    "gradient_accumulation_steps": ("梯度累积", "每个优化步累积的微批次数。"),
    "lr_scheduler_type": ("学习率调度", "学习率调度方式（transformers 的 SchedulerType 名称）。"),
    "warmup_ratio": ("预热比例", "学习率预热所占的步数比例。"),
    "weight_decay": ("权重衰减", "AdamW 权重衰减。"),
    "max_grad_norm": ("梯度裁剪", "梯度裁剪的范数上限。"),
    "bf16": ("bf16 混合精度", "使用 bfloat16 混合精度训练。"),
    "gradient_checkpointing": ("梯度检查点", "在反向传播中重新计算激活以节省显存（约多三分之一计算）。不设置：仅当 "
                               "lathe plan 估计不开启就放不下设备内存（device_memory）时开启，运行摘要会说明原因。"),
    "device_memory": ("设备内存上限", "每个设备可用的内存（GiB，如共享 GPU 或容器限制；CPU 上为每个进程的内存）。"
                      "不设置：设备总内存。"),
    "seed": ("随机种子", "随机种子。"),
    "lora_rank": ("LoRA 秩", "LoRA 的秩 r。"),
    "lora_alpha": ("LoRA alpha", "LoRA 缩放系数 alpha（默认 2 倍秩）。"),
    "lora_dropout": ("LoRA dropout", "LoRA 路径上的 dropout。"),
    "lora_target": ("LoRA 目标模块", "加 LoRA 的模块：`all`（除输出头外的所有线性层）或模块名。"),
    "pref_beta": ("偏好 beta", "dpo/kto：beta，向参考策略靠拢的力度。"),
    "pref_loss": ("偏好损失", "dpo：偏好损失（sigmoid 即 DPO；orpo 和 simpo 不需要参考模型）。"),
    "output_dir": ("输出文件夹", "保存权重、日志和完整配置的运行目录；必须是新的或空的文件夹。"),
    "logging_steps": ("日志间隔", "每 N 个优化步记录一次日志。"),
    "save_steps": ("保存间隔", "每 N 个优化步保存一次检查点。"),
    "eval_steps": ("评估间隔", "每 N 步评估一次（默认与保存间隔相同）。"),
    "plot_loss": ("保存损失曲线", "保存 training_loss.png（以及 training_eval_loss.png）。"),
    "task": ("评测基准", "task_dir 下的评测基准文件夹名，可带 _划分（例如 mmlu_test）。"),
    "task_dir": ("评测基准文件夹", "存放评测基准文件夹的目录。"),
    "n_shot": ("示例数（shot）", "从 dev 划分中取的少样本示例数。"),
    "lang": ("提示语言", "提示语的语言。"),
    "save_dir": ("结果文件夹", "写入 results.json 的文件夹（必须为空）。"),
    "eval_dataset": ("评估数据集", "只用于评估的数据集名称。"),
    "max_new_tokens": ("最大生成长度", "每条回复最多生成的 token 数。"),
    "do_sample": ("采样", "采样生成（true），或贪心 / 束搜索（false）。"),
    "temperature": ("温度", "采样温度。"),
    "top_p": ("Top-p", "核采样：只保留累计概率达到该值的最小 token 集合。"),
    "export_dir": ("导出文件夹", "合并后模型写入的文件夹（必须为空）。"),
    "export_dtype": ("导出精度", "导出权重的数据类型（auto：与基座检查点相同）。"),
    "export_size": ("分片大小（GB）", "每个权重分片的最大大小，单位 GB。"),
    "export_verify": ("校验导出", "重新加载导出的模型，检查 logits 和对话模板。"),
    "quantization_scheme": ("量化方案", "int8_dynamic（int8 权重，激活每次调用时量化；无需数据）、int8_static"
                            "（激活也量化，范围在校准数据上确定）、int8_weight_only、int4_weight_only。"),
    "calibration_dataset": ("校准数据集", "用于校准 int8_static 和敏感度扫描的数据集。"),
    "benchmark_repeats": ("计时次数", "每个延迟数据的计时次数（取中位数，先预热）；"
                                  "0：不计时（只报告磁盘大小和质量）。"),
}

# Every other word on the page: id -> (English, Chinese).
UI: dict[str, tuple[str, str]] = {
    "title": ("Lathe: fine-tune, watch, evaluate, chat, export", "Lathe：微调、监控、评估、对话、导出"),
    "tab_train": ("Train", "训练"),
    "tab_runs": ("Runs", "运行"),
    "tab_evaluate": ("Evaluate & predict", "评估与预测"),
    "tab_chat": ("Chat", "对话"),
    "tab_export": ("Export", "导出"),
    "tab_quantize": ("Quantize", "量化"),
    "language": ("中文", "English"),
    "group_model": ("Model", "模型"),
    "group_data": ("Data", "数据"),
    "group_method": ("Stage and method", "阶段与方法"),
    "group_hyper": ("Hyperparameters", "超参数"),
    "group_output": ("Output and logging", "输出与日志"),
    "group_benchmark": ("Benchmark (lathe eval)", "评测基准（lathe eval）"),
    "group_predict": ("Predict on a dataset (lathe predict)", "在数据集上预测（lathe predict）"),
    "group_export": ("Export (lathe export)", "导出（lathe export）"),
    "group_quantize": ("Quantize (lathe quantize)", "量化（lathe quantize）"),
    "group_sampling": ("Sampling", "采样设置"),
    "extra_yaml": ("Other keys (YAML)", "其他配置（YAML）"),
    "extra_yaml_help": ("Any other config key, one `key: value` per line (lathe keys lists them).",
                        "其他任意配置项，每行一个 `key: value`（lathe keys 可列出全部）。"),
    "yaml_preview": ("The equivalent config and command", "等价的配置与命令"),
    "preview_data": ("Preview the data", "预览数据"),
    "preview_help": ("Rendered examples: trained tokens are highlighted.",
                     "渲染后的样本：高亮部分是参与训练的 token。"),
    "suggest_template": ("Suggest template", "推荐模板"),
    "start": ("Start", "开始"),
    "stop": ("Stop", "停止"),
    "save_config": ("Save config", "保存配置"),
    "load_config": ("Load config", "加载配置"),
    "config_name": ("Config name", "配置名称"),
    "saved": ("Saved", "已保存"),
    "started": ("Started", "已开始"),
    "fix_fields": ("Fix the marked fields first; nothing was started.", "请先修正标出的字段；尚未开始任何任务。"),
    "runs_empty": ("No runs yet.", "还没有运行记录。"),
    "refresh": ("Refresh", "刷新"),
    "status_running": ("running", "运行中"),
    "status_done": ("finished", "已完成"),
    "status_failed": ("failed", "失败"),
    "status_stopped": ("stopped", "已停止"),
    "col_run": ("Run", "运行"),
    "col_verb": ("Command", "命令"),
    "col_status": ("Status", "状态"),
    "col_progress": ("Progress", "进度"),
    "col_loss": ("Loss", "损失"),
    "col_started": ("Started", "开始时间"),
    "loss_curve": ("Loss", "损失曲线"),
    "train_loss": ("training loss", "训练损失"),
    "eval_loss": ("eval loss", "验证损失"),
    "log_tail": ("Log (last lines)", "日志（最后几行）"),
    "results": ("Results", "结果"),
    "source_model": ("Run, export or model folder", "运行目录、导出或模型文件夹"),
    "source_help": ("A finished run directory, an export, a quantized model, or lathe:demo.",
                    "已完成的运行目录、导出的模型、量化后的模型，或 lathe:demo。"),
    "load_model": ("Load", "加载"),
    "loaded": ("Loaded", "已加载"),
    "system_prompt": ("System prompt", "系统提示词"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "you": ("You", "你"),
    "assistant": ("Assistant", "助手"),
    "run_eval": ("Run benchmark", "运行评测"),
    "run_predict": ("Run prediction", "运行预测"),
    "run_export": ("Export", "导出"),
    "run_quantize": ("Quantize", "量化"),
    "verification": ("Verification", "校验结果"),
    "length_stats": ("Token lengths", "Token 长度"),
    "rows": ("rows", "行"),
    "stat_mean": ("mean", "平均"),
    "stat_p50": ("median", "中位数"),
    "stat_p95": ("95th percentile", "95 分位"),
    "stat_max": ("max", "最大"),
    "truncated": ("truncated", "被截断"),
    "padding": ("padding at this batch size", "该批大小下的填充比例"),
    "no_runs_to_pick": ("(type a folder)", "（输入文件夹路径）"),
    "waiting": ("Working…", "处理中…"),
    "step": ("step", "步"),
}


def key_label(key: str, lang: str) -> str:
    if lang == "zh":
        return KEYS_ZH[key][0]
    return LABELS_EN.get(key) or key.replace("_", " ").capitalize()


def key_help(key: str, english_help: str, lang: str) -> str:
    return KEYS_ZH[key][1] if lang == "zh" else english_help


def words(lang: str) -> dict[str, str]:
    index = LANGS.index(lang)
    return {k: v[index] for k, v in UI.items()}
