"""Architecture x method, as the PEFT support tables list them: every pair trains a few
steps through Lathe's own method modules (loss falls, trained tensors move, frozen ones do
not), saves, reloads with plain peft to the same logits, and generates a left-padded batch
through Lathe's engine to what each row generates alone (prompt-learning adapters generate
row by row: with virtual tokens a left-padded row's positions shift, and on some pairs peft
raises; a test checks that it still does). The README shows this table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lathe.config import load_config
from lathe.model.adapters import apply_finetuning
from lathe.model.methods.prompt_learning import PADDED_GENERATION_CRASHES, padded_generation_fails

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96
ARCHS = ["gpt2", "bloom", "opt", "gpt_neo", "gptj", "gpt_neox", "llama", "glm"]
METHODS = ["lora", "prefix", "ptuning", "prompt", "ia3", "adalora"]


def build(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **small))
    if arch == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **small))
    if arch == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              ffn_dim=32, max_position_embeddings=64, word_embed_proj_dim=16,
                                              **small))
    if arch == "gpt_neo":
        return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, window_size=16,
                                                    attention_types=[[["global", "local"], 1]],
                                                    max_position_embeddings=64, **small))
    if arch == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=64,
                                                **small))
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=32, max_position_embeddings=64, **small))
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1,
                                                  max_position_embeddings=64, **small))
    if arch == "glm":
        return tf.GlmForCausalLM(tf.GlmConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                              max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                              bos_token_id=2, **small))
    raise ValueError(arch)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture saved once, loaded back through from_pretrained (the real path)."""
    root = tmp_path_factory.mktemp("archs")
    for arch in ARCHS:
        build(arch).save_pretrained(root / arch)
    return root


def _batch():
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a padded row: every real batch has them
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _keys(method: str) -> dict:
    keys = {"num_virtual_tokens": 4} if method in ("prefix", "ptuning", "prompt") else {}
    return load_config({"model_name_or_path": "x", "dataset": "d", "output_dir": "o",
                        "finetuning_type": method, **keys})


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_method_on_architecture(arch, method, saved, tmp_path):
    cfg = _keys(method)
    model = apply_finetuning(_load(saved / arch), cfg.finetune, cfg.model)
    ids, mask, labels = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trained)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trained)

    from peft import PeftModel

    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load(saved / arch), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    from lathe.config.schema import GenerateConfig
    from lathe.infer import generate_replies

    class Tok:
        pad_token_id = 0

    prompts = [ids[0, :6].tolist(), ids[1, :4].tolist()]  # different lengths: one row left-padded
    gen = GenerateConfig(max_new_tokens=3, do_sample=False)
    batched = generate_replies(reloaded, Tok(), prompts, gen, stop_ids=[], batch_size=2, progress=False)
    alone = [generate_replies(reloaded, Tok(), [p], gen, stop_ids=[], batch_size=1, progress=False)[0]
             for p in prompts]
    assert batched == alone and all(len(r) == 3 for r in batched)
    assert (padded_generation_fails(reloaded) is not None) == (method in ("prefix", "ptuning", "prompt"))


@pytest.mark.parametrize("arch,method", sorted(PADDED_GENERATION_CRASHES))
def test_peft_really_fails_to_generate_a_padded_batch_there(arch, method, saved):
    """peft's own batched generation breaks on left padding for these pairs; when it stops
    breaking, Lathe's row-by-row fallback must go."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    config = {"prefix": PrefixTuningConfig, "ptuning": PromptEncoderConfig,
              "prompt": PromptTuningConfig}[method](task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                    **({"encoder_hidden_size": 16} if method == "ptuning" else {}))
    model = get_peft_model(_load(saved / arch), config)
    ids, mask, _ = _batch()
    with pytest.raises(RuntimeError):
        model.generate(input_ids=ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=3, do_sample=False)


def test_the_readme_table_is_this_matrix():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| architecture | lora |"):].split("\n\n")[0]
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ARCHS
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        arch, marks = cells[0], cells[1:]
        assert len(marks) == len(METHODS)
        for method, mark in zip(METHODS, marks):
            assert mark == "yes", (arch, method, mark)


@pytest.mark.parametrize("arch", ["falcon", "mamba"])
def test_prefix_where_peft_cannot_prefix_is_one_line(arch):
    """Mamba has no attention to put a prefix in front of (peft refuses it); Falcon's fused
    multi-query attention breaks at the first forward. Both are one line, before training."""
    import transformers as tf

    from lathe.errors import ConfigError

    torch.manual_seed(0)
    model = (tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2)) if arch == "falcon" else
             tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2)))
    cfg = _keys("prefix")
    with pytest.raises(ConfigError, match=f"finetuning_type: prefix does not work on {arch} in peft"):
        apply_finetuning(model, cfg.finetune, cfg.model)
