"""Sample packing: bins, packed rows, the collator, and proof that packing changes no loss."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from lathe.data.loader import DataStats, SplitData
from lathe.data.packing import (
    PackedCollator,
    check_packing_support,
    first_fit_decreasing,
    pack_dataset,
    pack_for_training,
    padding_fraction,
)
from lathe.errors import ConfigError

IGNORE = -100
VOCAB = 97


# --- first-fit decreasing ---------------------------------------------------------------

def _next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Packing in data order: a new row whenever the next example does not fit."""
    bins: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_ffd_bins_hold_every_index_once_and_never_overflow(seed):
    rng = random.Random(seed)
    capacity = 64
    lengths = [rng.choice([rng.randint(1, 8), rng.randint(20, 64)]) for _ in range(300)]
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) >= -(-sum(lengths) // capacity)  # cannot beat the volume bound
    assert len(bins) <= len(_next_fit(lengths, capacity))
    # first fit: no later bin's first (longest) example would have fitted into an earlier bin
    for k, b in enumerate(bins):
        for earlier in bins[:k]:
            assert sum(lengths[i] for i in earlier) + lengths[b[0]] > capacity


def test_ffd_beats_in_order_packing_on_a_crafted_case():
    lengths = [3, 3, 7, 7]  # in order: [3, 3] [7] [7]; longest first: [7, 3] [7, 3]
    assert len(_next_fit(lengths, 10)) == 3
    bins = first_fit_decreasing(lengths, 10)
    assert len(bins) == 2 and sorted(sorted(b) for b in bins) == [[0, 2], [1, 3]]


def test_ffd_edge_cases():
    assert first_fit_decreasing([], 8) == []
    assert first_fit_decreasing([8], 8) == [[0]]
    with pytest.raises(ValueError, match="longer than the capacity"):
        first_fit_decreasing([3, 9], 8)


def test_padding_is_lower_with_packing_on_skewed_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(4, 16) for _ in range(90)] + [rng.randint(100, 128) for _ in range(10)]
    plain = padding_fraction(lengths, batch_size=8, multiple_of=8)
    packed = padding_fraction(lengths, batch_size=8, packed=True, capacity=128, multiple_of=8)
    assert plain > 0.5 and packed < 0.25 and packed < plain
    assert padding_fraction([16] * 8, batch_size=4) == 0.0


# --- packed rows and the collator ----------------------------------------------------------

def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Random examples whose first third is prompt (label -100), the rest trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:],
                    "attention_mask": [1] * n})
    return out


def _dataset(examples):
    from datasets import Dataset

    return Dataset.from_list(examples)


def test_packed_rows_restart_positions_and_mask_each_first_label():
    examples = _examples([9, 4, 13, 6, 2, 11, 7])
    packed = pack_dataset(_dataset(examples), 20)
    assert len(packed) < len(examples)
    seen = []
    for row in packed:
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == len(labels) == len(pos) <= 20
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        assert starts[0] == 0
        for s, e in zip(starts, starts[1:]):
            assert pos[s:e] == list(range(e - s))
            assert labels[s] == IGNORE
            seen.append((ids[s:e], labels[s + 1:e]))
    # every example comes back whole, exactly once
    expected = sorted((x["input_ids"], x["labels"][1:]) for x in examples)
    assert sorted(seen) == expected


def test_collator_pads_with_own_segment_and_sends_no_attention_mask():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, IGNORE, 8, 9],
             "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [5, 6], "labels": [IGNORE, 6], "position_ids": [0, 1]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    assert batch["labels"][1].tolist() == [IGNORE, 6] + [IGNORE] * 6
    flat = PackedCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, 7)
    assert flat["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 1]


# --- proof: packed loss == unpacked loss, token by token -------------------------------------

def _tiny(arch: str, impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  pad_token_id=0, initializer_range=0.2)  # logits that depend on the context
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def _pad_tokenizer():
    """A tokenizer whose pad id is 0; the unpacked collator only needs it for padding."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", unk_token="<unk>")


def _token_losses(logits, labels) -> list[float]:
    """Per-token cross-entropy of each position's prediction of the next token."""
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], reduction="none",
                                             ignore_index=IGNORE)
    return loss[labels[1:] != IGNORE].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_forward_matches_unpacked_per_token(arch, impl, flatten):
    from transformers import DataCollatorForSeq2Seq

    model = _tiny(arch, impl)
    assert model.config._attn_implementation == impl
    examples = _examples([9, 4, 13, 6, 2, 11, 7, 16, 3])

    # unpacked: the recipe's usual collator (right padding + attention_mask)
    plain = DataCollatorForSeq2Seq(_pad_tokenizer(), padding=True, label_pad_token_id=IGNORE,
                                   pad_to_multiple_of=8)([dict(x) for x in examples])
    with torch.no_grad():
        out = model(**plain)
    want = {}
    for i, x in enumerate(examples):
        n = len(x["input_ids"])
        want[tuple(x["input_ids"])] = _token_losses(out.logits[i, :n], plain["labels"][i, :n])

    packed = pack_dataset(_dataset(examples), 20)
    assert len(packed) < len(examples)
    batch = PackedCollator(pad_token_id=0, flatten=flatten)(list(packed))
    with torch.no_grad():
        pout = model(**batch)

    got = {}
    for r in range(batch["input_ids"].shape[0]):
        ids, pos, labels = batch["input_ids"][r], batch["position_ids"][r], batch["labels"][r]
        starts = (pos == 0).nonzero().view(-1).tolist() + [len(ids)]
        for s, e in zip(starts, starts[1:]):
            if (labels[s:e] != IGNORE).any():  # not a padding segment
                got[tuple(ids[s:e].tolist())] = _token_losses(pout.logits[r, s:e], labels[s:e])
    assert got.keys() == want.keys()
    diff = max(abs(a - b) for k in want for a, b in zip(got[k], want[k], strict=True))
    assert diff < 1e-5, diff
    assert abs(pout.loss.item() - out.loss.item()) < 1e-5  # the batch loss too (same trained tokens)

    # the comparison can fail: the same rows without boundaries (no position_ids) differ a lot
    with torch.no_grad():
        blind = model(**{k: v for k, v in batch.items() if k != "position_ids"})
    assert abs(blind.loss.item() - out.loss.item()) > 1e-2


def test_a_cache_would_silently_break_packing_so_the_collator_turns_it_off():
    model = _tiny("llama", "sdpa")
    model.config.use_cache = True  # the saved default of most models
    rows = pack_dataset(_dataset(_examples([6, 5])), 16)
    batch = PackedCollator(pad_token_id=0)(list(rows))
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([x["input_ids"]])).logits[0] for x in _examples([6, 5])]
        leaky = model(**{**batch, "use_cache": True}).logits[0, 6:11]
        honest = model(**batch).logits[0, 6:11]
    assert (leaky - alone[1]).abs().max() > 1e-2  # transformers skips packing when a cache exists
    assert (honest - alone[1]).abs().max() < 1e-5
    check_packing_support(model, PackedCollator(pad_token_id=0))


# --- refusing what cannot be packed ----------------------------------------------------------

def test_supported_models_pass_the_probe():
    for arch in ("llama", "qwen2"):
        for impl in ("sdpa", "eager"):
            assert check_packing_support(_tiny(arch, impl), PackedCollator(pad_token_id=0)) < 1e-5


def test_a_model_whose_attention_ignores_position_ids_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    # OPT builds its causal mask without position_ids, so packed examples would see each other
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg)
    data = SplitData(_dataset(_examples([5, 6, 7])), None, DataStats())
    with pytest.raises(ConfigError, match="does not keep packed examples apart.*set packing: false") as e:
        pack_for_training(data, model, SimpleNamespace(pad_token_id=1), 32, 2)
    assert "\n" not in str(e.value)
    assert model.training  # the probe leaves the model as it found it


def test_pack_for_training_packs_both_splits_and_writes_the_note():
    model = _tiny("llama", "sdpa").train()
    data = SplitData(_dataset(_examples([9, 4, 13, 6, 2, 11, 7])), _dataset(_examples([5, 5, 5], seed=1)),
                     DataStats())
    packed, collator, note = pack_for_training(data, model, SimpleNamespace(pad_token_id=0), 20, 4)
    assert isinstance(collator, PackedCollator) and not collator.flatten
    assert len(packed.train) < 7 and len(packed.eval) == 1
    assert "without packing" in note and "with packing" in note and "7 examples into" in note
    assert model.training


def test_streaming_data_cannot_be_packed():
    from datasets import IterableDataset

    stream = IterableDataset.from_generator(lambda: iter(_examples([3, 4])))
    with pytest.raises(ConfigError, match="streaming: false or packing: false"):
        pack_for_training(SplitData(stream, None, DataStats()), _tiny("llama", "sdpa"),
                          SimpleNamespace(pad_token_id=0), 16, 2)


# --- padding-free batches: the same examples per step, without padding --------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_a_padding_free_batch_has_the_padded_batch_loss_and_gradients(arch, impl, flatten):
    from lathe.data.collators import LMCollator
    from lathe.data.packing import PaddingFreeCollator

    model = _tiny(arch, impl).train()
    examples = _examples([9, 4, 13, 6, 2, 11, 7, 16])
    padded = LMCollator(0)(examples)
    free = PaddingFreeCollator(0, flatten=flatten)(examples)
    assert "attention_mask" not in free and free["use_cache"] is False
    assert free["input_ids"].numel() < padded["input_ids"].numel()  # fewer tokens pushed through
    assert (free["labels"][..., 1:] != IGNORE).sum() == (padded["labels"][..., 1:] != IGNORE).sum()
    results = []
    for batch in (padded, free):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5 * abs(loss_a)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-5
    # the comparison can fail: the same rows with no boundaries between the examples
    with torch.no_grad():
        crossed = model(**{k: v for k, v in free.items() if k != "position_ids"}).loss.item()
    assert abs(crossed - loss_a) > 1e-3


def test_padding_free_rows_hold_every_example_once_within_the_capacity():
    from lathe.data.packing import PaddingFreeCollator, padding_free_fraction

    examples = _examples([12, 3, 3, 5, 9, 2])
    batch = PaddingFreeCollator(0, capacity=14)(examples)
    rows = batch["input_ids"].shape[0]
    assert batch["input_ids"].shape[1] == 16 and rows == 3  # 34 tokens in rows of <= 14, padded to 8s
    seen = []
    for r in range(rows):
        pos, ids = batch["position_ids"][r].tolist(), batch["input_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        seen += [ids[s:e] for s, e in zip(starts, starts[1:]) if batch["labels"][r, s + 1:e].ne(IGNORE).any()]
    assert sorted(seen) == sorted(x["input_ids"] for x in examples)
    long_one = PaddingFreeCollator(0, capacity=4)(_examples([9, 2]))  # longer than the capacity: a row of its own
    assert long_one["input_ids"].shape == (2, 16)
    # the padding estimate: all four fit one row of 16 -> none left (padded batches: 10 and 2s -> 55%)
    assert padding_free_fraction([10, 2, 2, 2], 4, 16, multiple_of=1) == 0.0
    assert padding_fraction([10, 2, 2, 2], 4) == pytest.approx(0.6)


def test_padding_free_is_off_with_a_note_or_refused_when_the_model_crosses_examples():
    from transformers import OPTConfig, OPTForCausalLM

    from lathe.data.packing import padding_free_for_training

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128)
    model = OPTForCausalLM(cfg)
    data = SplitData(_dataset(_examples([5, 6, 7])), None, DataStats())
    collator, note = padding_free_for_training(data, model, SimpleNamespace(pad_token_id=1), None, 2)
    assert collator is None and note.startswith("padding-free batches off: OPTForCausalLM")
    with pytest.raises(ConfigError, match=r"padding_free: true, but OPTForCausalLM .* set padding_free: false$"):
        padding_free_for_training(data, model, SimpleNamespace(pad_token_id=1), True, 2)
    llama = _tiny("llama", "sdpa")
    collator, note = padding_free_for_training(data, llama, SimpleNamespace(pad_token_id=0), None, 2)
    assert collator is not None and "padding-free batches: rows no longer than the longest example; padding" in note


# --- dpo: padding-free pairs and log-probs from the hidden states -------------------------------

def _pairs(lengths: list[tuple[int, int]]) -> list[dict[str, list[int]]]:
    chosen = _examples([c for c, _ in lengths], seed=1)
    rejected = _examples([r for _, r in lengths], seed=2)
    return [{"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
             "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]} for c, r in zip(chosen, rejected)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [False, True])
def test_padding_free_pairs_give_each_sequence_the_padded_log_probs_and_gradients(arch, impl, fused):
    """dpo's log-probs per sequence (chosen 0..n-1, rejected n..2n-1) and the gradient of a loss
    weighing each sequence differently: padding-free pairs (with or without the fused output
    layer) equal the padded pair batch's to 1e-5; each side's rows alone give its half."""
    from lathe.data.collators import PairCollator
    from lathe.data.packing import PaddingFreePairCollator
    from lathe.recipes.trainers import PolicyReferenceTrainer, _pair_halves

    model = _tiny(arch, impl).train()
    pairs = _pairs([(9, 4), (13, 6), (5, 11), (7, 16)])
    padded = PairCollator(0)(pairs)
    free = PaddingFreePairCollator(0)(pairs)
    assert free["input_ids"].numel() < padded["input_ids"].numel()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5])
    results = []
    for batch, use_fused in ((padded, False), (free, fused)):
        me = SimpleNamespace(fused=use_fused)
        model.zero_grad()
        total, count = PolicyReferenceTrainer.logps(me, model, batch)
        (total * weights).sum().backward()
        results.append((total.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (ta, ca, ga), (tb, cb, gb) = results
    assert torch.equal(ca, cb) and ca.tolist() == [(len(x) - len(x) // 3) for x in
                                                  [p["chosen_input_ids"] for p in pairs] +
                                                  [p["rejected_input_ids"] for p in pairs]]
    assert torch.allclose(ta, tb, rtol=1e-5, atol=1e-5)
    largest = max(a.abs().max().item() for a in ga)  # float32 sums in another order: relative to it
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 2e-6 * largest  # measured: 6e-7
    n, chosen, rejected = _pair_halves(free)
    assert n == 4 and chosen["input_ids"].shape[0] == free["chosen_rows"]
    with torch.no_grad():
        me = SimpleNamespace(fused=fused)
        assert torch.allclose(PolicyReferenceTrainer.logps(me, model, chosen)[0], ta[:4], rtol=1e-5, atol=1e-5)
        assert torch.allclose(PolicyReferenceTrainer.logps(me, model, rejected)[0], ta[4:], rtol=1e-5, atol=1e-5)
        # the comparison can fail: the same rows with no boundaries between the sequences
        crossed = dict(free, position_ids=torch.arange(free["input_ids"].shape[1]).expand_as(free["input_ids"]))
        assert (PolicyReferenceTrainer.logps(me, model, crossed)[0] - ta).abs().max() > 1e-3


def test_pair_padding_estimates_what_the_pair_collator_saves():
    from lathe.data.packing import PaddingFreePairCollator, pair_padding

    before, after = pair_padding([30, 5, 5, 5], [4, 4, 4, 4], 4, shuffles=1)
    # padded: 8 rows of 32 = 256 slots for 61 tokens; free: chosen [30] [5 5 5] + rejected [4 4 4 4] -> 3 rows of 32
    assert before == pytest.approx(1 - 61 / 256) and after == pytest.approx(1 - 61 / 96)
    batch = PaddingFreePairCollator(0)(_pairs([(30, 4), (5, 4), (5, 4), (5, 4)]))
    assert batch["input_ids"].shape == (3, 32) and batch["chosen_rows"] == 2


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "varlen"])
def test_padding_free_kto_batches_give_the_padded_log_probs(flatten):
    """kto: the rows (sequences 0..n-1) and their KL rows (n..2n-1) of PaddingFreeKTOCollator give
    each sequence the log-prob KTOCollator's padded batch gives it, the tags ride along, and the
    halves hold the rows and the KL rows apart."""
    from lathe.data.collators import KTOCollator
    from lathe.data.packing import PaddingFreeKTOCollator
    from lathe.model.varlen import use_varlen_sdpa
    from lathe.recipes.trainers import PolicyReferenceTrainer, _pair_halves

    model = _tiny("llama", "sdpa")
    if flatten:
        use_varlen_sdpa(model)
    rows = [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"],
             "kl_input_ids": p["rejected_input_ids"], "kl_labels": p["rejected_labels"], "kto_tag": i % 2 == 0}
            for i, p in enumerate(_pairs([(9, 14), (13, 6), (5, 11)]))]
    padded = KTOCollator(0)(rows)
    free = PaddingFreeKTOCollator(0, flatten=flatten)(rows)
    assert free["kto_tag"].tolist() == [True, False, True] and torch.equal(free["kto_tag"], padded["kto_tag"])
    assert free["input_ids"].shape[0] == (2 if flatten else free["input_ids"].shape[0])
    me = SimpleNamespace(fused=False)
    with torch.no_grad():
        want = torch.cat([PolicyReferenceTrainer.logps(me, model, padded)[0],
                          PolicyReferenceTrainer.logps(me, model, padded, prefix="kl_")[0]])
        assert torch.allclose(PolicyReferenceTrainer.logps(me, model, free)[0], want, rtol=1e-5, atol=1e-5)
        n, main, kl = _pair_halves(free)
        assert n == 3 and "kto_tag" not in main
        assert torch.allclose(PolicyReferenceTrainer.logps(me, model, main)[0], want[:3], rtol=1e-5, atol=1e-5)
        assert torch.allclose(PolicyReferenceTrainer.logps(me, model, kl)[0], want[3:], rtol=1e-5, atol=1e-5)
