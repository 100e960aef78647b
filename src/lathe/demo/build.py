"""The embedded default: a tiny Llama-architecture model and a byte-level BPE tokenizer.

Both are built locally (no hub), saved with `save_pretrained` and loaded back with
`from_pretrained` by the caller, the same code path a real checkpoint takes. The
result is cached, keyed by DEMO_VERSION, so later runs start at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_VERSION = "1"
DATA_DIR = Path(__file__).parent / "data"

# A ChatML template (the demo trains with `template: chatml`), as the tokenizer's own
# Jinja template so that `apply_chat_template` renders exactly what Lathe trains on.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    # Wider than the usual 0.02: with a frozen random head, LoRA can then reach confident
    # logits, so the demo's loss visibly falls instead of plateauing near log(vocab).
    initializer_range: float = 0.1
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("LATHE_HOME", Path.home() / ".cache" / "lathe"))


def training_texts() -> list[str]:
    """The bundled corpus plus the identity set, so the tokenizer knows both."""
    lines = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for row in json.loads((DATA_DIR / "identity.json").read_text(encoding="utf-8")):
        lines += [row["instruction"], row["output"]]
    return [x for x in lines if x.strip()]


def build_tokenizer(vocab_size: int, extra_special_tokens: Sequence[str] = ()):
    """Train a byte-level BPE tokenizer on the bundled text.

    `extra_special_tokens` are added after SPECIAL_TOKENS as special tokens (tests use them
    to build tokenizers that carry other models' chat-template tokens).
    """
    extra = [t for t in dict.fromkeys(extra_special_tokens) if t not in SPECIAL_TOKENS]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *extra],
    )
    fast.chat_template = CHATML_JINJA
    return fast


def build_tiny_model(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write tokenizer + randomly initialised LlamaForCausalLM to `out_dir` (atomically)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        tokenizer = build_tokenizer(spec.vocab_size)
        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            initializer_range=spec.initializer_range,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lathe_demo.json").write_text(json.dumps({"version": DEMO_VERSION, **asdict(spec)}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_demo_model(root: Path | None = None) -> Path:
    """The cached demo model folder, built on first use."""
    path = (root or cache_root()) / f"demo-model-v{DEMO_VERSION}"
    if not (path / "lathe_demo.json").is_file():
        print(f"Building the embedded demo model in {path} (once) ...", flush=True)
        build_tiny_model(path)
    return path
