"""Architecture x method for the task heads, as the PEFT tables list them: sequence and token
classification on BERT, RoBERTa, DeBERTa-v2, GPT-2, Bloom and OPT; seq2seq on T5 and BART.
Every pair trains a few steps through Lathe's own method modules with the task's peft task
type (loss falls, trained tensors move, frozen ones do not, the new head trains with the
adapter), saves, and reloads with plain peft on the plain AutoModelFor... class to the same
logits. Pairs peft cannot do are one line at apply time (REFUSED, checked to still refuse).
The README shows this table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lathe.config import load_config
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import PEFT_TASK_TYPE, auto_class

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96
LABELS = 3
ENCODER_ARCHS = ["bert", "roberta", "deberta-v2", "gpt2", "bloom", "opt"]
SEQ2SEQ_ARCHS = ["t5", "bart"]
METHODS = ["lora", "prefix", "ptuning", "prompt", "ia3", "adalora"]
# transformers has no OPT token classifier (stage tagging refuses OPT in one line, tested below)
CELLS = [(a, t) for t in ("seq_cls", "token_cls") for a in ENCODER_ARCHS if (a, t) != ("opt", "token_cls")] + \
    [(a, "seq2seq") for a in SEQ2SEQ_ARCHS]
# peft cannot prefix these: their classification models take no past key values in transformers 5
REFUSED = {(a, t, "prefix") for a in ("bert", "roberta", "deberta-v2", "gpt2", "bloom", "opt")
           for t in ("seq_cls", "token_cls")}
# peft puts the virtual tokens' logits in front of the tags (its loss then fails on the length):
# Lathe's tagging stage refuses ptuning and prompt
REFUSED |= {(a, "token_cls", m) for a in ENCODER_ARCHS for m in ("ptuning", "prompt")}


def config(arch: str):
    import transformers as tf

    small = dict(vocab_size=VOCAB, pad_token_id=0)
    return {
        "bert": lambda: tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64, **small),
        "roberta": lambda: tf.RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=70, **small),
        "deberta-v2": lambda: tf.DebertaV2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=32, max_position_embeddings=64, **small),
        "gpt2": lambda: tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **small),
        "bloom": lambda: tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **small),
        "opt": lambda: tf.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                                    max_position_embeddings=64, word_embed_proj_dim=16, **small),
        "t5": lambda: tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, decoder_start_token_id=0,
                                  eos_token_id=1, dropout_rate=0.0, **small),
        "bart": lambda: tf.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                      max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
                                      decoder_start_token_id=1, forced_eos_token_id=1, dropout=0.0, **small),
    }[arch]()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture and head saved once, loaded back through from_pretrained (the real path)."""
    root = tmp_path_factory.mktemp("task-archs")
    for arch, task in CELLS:
        torch.manual_seed(0)
        auto, _ = auto_class(task)
        cfg = config(arch)
        if task != "seq2seq":
            cfg.num_labels = LABELS
        auto.from_config(cfg).save_pretrained(root / f"{arch}-{task}")
    return root


def _load(saved: Path, arch: str, task: str):
    auto, _ = auto_class(task)
    return auto.from_pretrained(saved / f"{arch}-{task}")


def _batch(task: str):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    if task == "seq_cls":
        labels = torch.tensor([0, 2])
    elif task == "token_cls":
        labels = torch.randint(0, LABELS, (2, 12), generator=torch.Generator().manual_seed(2))
        labels[1, 9:] = -100
    else:
        labels = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    return ids, mask, labels


def _cfg(method: str):
    keys = {"num_virtual_tokens": 4} if method in ("prefix", "ptuning", "prompt") else {}
    return load_config({"model_name_or_path": "x", "dataset": "d", "output_dir": "o", "finetuning_type": method,
                        **keys})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,task", CELLS)
def test_method_on_task_head(arch, task, method, saved, tmp_path):
    torch.manual_seed(0)  # adapters start random: the same start whatever ran before on this worker
    cfg = _cfg(method)
    if (arch, task, method) in REFUSED:
        if method == "prefix":  # one line at apply time
            with pytest.raises(ConfigError, match=f"finetuning_type: {method} does not work on"):
                apply_finetuning(_load(saved, arch, task), cfg.finetune, cfg.model, task_type=PEFT_TASK_TYPE[task])
        else:  # one line from the config check, and peft still fails (else the refusal must go)
            with pytest.raises(ConfigError, match=f"finetuning_type: {method} with stage tagging"):
                load_config({"model_name_or_path": "x", "dataset": "d", "output_dir": "o", "stage": "tagging",
                             "finetuning_type": method})
            model = apply_finetuning(_load(saved, arch, task), cfg.finetune, cfg.model, task_type=PEFT_TASK_TYPE[task])
            ids, mask, labels = _batch(task)
            with pytest.raises((ValueError, RuntimeError), match="batch_size|is invalid for input"):
                model(input_ids=ids, attention_mask=mask, labels=labels)
        return
    model = apply_finetuning(_load(saved, arch, task), cfg.finetune, cfg.model, task_type=PEFT_TASK_TYPE[task])
    ids, mask, labels = _batch(task)
    model.eval()  # no dropout: eight steps on one batch must lower its loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
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
    if task != "seq2seq":  # the new head trains beside the adapter
        assert any(("classifier" in n or "score" in n or "classification_head" in n) for n in trained), trained

    from peft import PeftModel

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load(saved, arch, task), tmp_path / "adapter").eval()
    decoder = {"decoder_input_ids": labels} if task == "seq2seq" else {}
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, **decoder).logits
        theirs = reloaded(input_ids=ids, attention_mask=mask, **decoder).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_the_readme_table_is_this_matrix():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| architecture | task | lora |"):].split("\n\n")[0]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in table.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(a, {"seq_cls": "sequence classification", "token_cls": "token "
                                             "classification", "seq2seq": "seq2seq"}[t]) for a, t in CELLS]
    for (arch, task), row in zip(CELLS, rows):
        for method, mark in zip(METHODS, row[2:]):
            assert mark == ("no" if (arch, task, method) in REFUSED else "yes"), (arch, task, method, mark)


def test_a_head_transformers_lacks_is_one_line(tmp_path):
    from lathe.errors import ModelError
    from lathe.model.load import check_task_head

    config("opt").save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="stage tagging needs a model with a token-classification head, and opt "
                                         "has none in transformers"):
        check_task_head(str(tmp_path), "token_cls", "tagging")
