"""lathe.model.varlen: sdpa cut per example for padding-free rows, and plain sdpa everywhere else.

The yardstick is the model on transformers' own sdpa: each example alone (training rows), or the
same padded batch and the same generation (the paths that must not change)."""

from __future__ import annotations

import pytest
import torch

from lathe.data.packing import VARLEN_SDPA, PackedCollator, make_collator, pack_row
from lathe.model import varlen
from lathe.model.varlen import use_varlen_sdpa

VOCAB = 97


def _tiny(arch: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, initializer_range=0.2, **extra)  # GQA; logits that depend on the context
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_row_of_examples_equals_each_example_alone(arch):
    """Logits and gradients: the packed row under VARLEN_SDPA against every example on its own under
    sdpa. The same row under plain sdpa with no boundaries differs (the check can fail)."""
    model = _tiny(arch)
    seqs = _sequences([9, 4, 13, 6])
    alone = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    sum(a.square().sum() for a in alone).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    assert use_varlen_sdpa(model) is None and model.config._attn_implementation == VARLEN_SDPA
    collator = make_collator(model, type("T", (), {"pad_token_id": 0})())
    assert collator.flatten  # one row, as for FlashAttention's varlen kernels
    batch = collator([pack_row([(s, s) for s in seqs])])
    assert batch["input_ids"].shape == (1, sum(map(len, seqs)))
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    parts = out.split([len(s) for s in seqs])
    for got, expected in zip(parts, alone):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    sum(p.square().sum() for p in parts).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)

    model.set_attn_implementation("sdpa")
    crossed = model(input_ids=batch["input_ids"], use_cache=False).logits[0].split([len(s) for s in seqs])
    assert (crossed[1] - alone[1]).abs().max() > 1e-2  # without the boundaries, example 2 reads example 1


def test_padded_batches_and_generation_are_plain_sdpa():
    """Everything that is not a training row takes sdpa's own path: a left-padded batch, and
    greedy generation with its cache, give what sdpa gives."""
    model = _tiny("llama")
    seqs = _sequences([5, 9, 3], seed=1)
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])

    def run():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return logits, gen

    want_logits, want_gen = run()
    use_varlen_sdpa(model)
    got_logits, got_gen = run()
    torch.testing.assert_close(got_logits * mask[..., None], want_logits * mask[..., None], atol=1e-5, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_sliding_window_models_keep_their_attention():
    model = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert use_varlen_sdpa(model) == "sliding-window attention"
    assert model.config._attn_implementation == "sdpa"
    assert not make_collator(model, type("T", (), {"pad_token_id": 0})()).flatten
    eager = _tiny("llama")
    eager.set_attn_implementation("eager")
    assert use_varlen_sdpa(eager) == "its attention is eager, not sdpa"


def test_a_padding_free_sft_run_uses_it_and_saves_plain_sdpa(tmp_path, base_args):
    """End to end through the recipe: the run trains on one row per batch and its saved config
    names no attention of Lathe's (other tools load it)."""
    import json
    from pathlib import Path

    from tests.conftest import run_main, write_yaml

    args = {**base_args, "finetuning_type": "full", "max_steps": 2, "learning_rate": 1e-3}
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "one row per batch (varlen attention)" in r.stdout
    config = json.loads((Path(args["output_dir"]) / "config.json").read_text())
    assert VARLEN_SDPA not in json.dumps(config)


def test_the_data_layer_names_the_attention_the_model_layer_registers():
    assert varlen.VARLEN_SDPA == VARLEN_SDPA


def test_packed_collator_flattens_for_varlen():
    rows = [pack_row([([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])]), pack_row([([4, 4, 4, 4], [4, 4, 4, 4])])]
    flat = PackedCollator(0, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, 9) and flat["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_pairs_flatten_to_one_row_a_side_and_each_side_drops_its_padding():
    from lathe.data.packing import PaddingFreePairCollator
    from lathe.recipes.trainers import _pair_halves

    feats = [{"chosen_input_ids": [5] * c, "chosen_labels": [5] * c, "rejected_input_ids": [6] * r,
              "rejected_labels": [6] * r} for c, r in ((9, 3), (4, 2), (7, 1))]
    batch = PaddingFreePairCollator(0, flatten=True, pad_to_multiple_of=1)(feats)
    assert batch["chosen_rows"] == 1 and batch["input_ids"].shape == (2, 20)  # 9 + 4 + 7 chosen tokens
    pairs, chosen, rejected = _pair_halves(batch)
    assert pairs == 3 and chosen["input_ids"].shape == (1, 20) and rejected["input_ids"].shape == (1, 6)
    assert rejected["seq_index"][0].tolist() == [3, 3, 3, 4, 4, 5]  # rejected i: batch + i
