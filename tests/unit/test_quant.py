"""lathe.quant: each quantized layer against the float one, its stored form, whole models saved
and reloaded (tied and shared weights), layer selection, and the quantize checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lathe.config.load import load_config
from lathe.errors import ConfigError
from lathe.model.quant.convert import SCHEMES, candidates, matches, skipped, swap
from lathe.model.quant.modules import LAYERS, Int8Embedding, WeightOnlyInt4Linear
from lathe.model.quant.store import load_quantized, save_quantized

# the largest |quantized - float| output of one layer, as a fraction of the largest |float| output
BOUND = {"int8_dynamic": 0.03, "int8_static": 0.05, "int8_weight_only": 0.01, "int4_weight_only": 0.15}


@pytest.mark.parametrize("kind", ["int8_dynamic", "int8_static", "int8_weight_only", "int4_weight_only"])
def test_a_layer_is_close_to_float_and_its_stored_form_rebuilds_it_exactly(kind):
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 48), torch.randn(4, 7, 64)
    ref = layer(x).detach()
    ranges = {"in": (float(x.min()), float(x.max())), "out": (float(ref.min()), float(ref.max()))}
    q = LAYERS[kind].from_float(layer, ranges=ranges, group_size=32)
    with torch.no_grad():
        y = q(x)
    assert y.shape == ref.shape
    err = float((y - ref).abs().max()) / float(ref.abs().max())
    assert 0 < err < BOUND[kind], err  # quantized (not a copy of the float layer) and close to it
    meta = {"group_size": 32}
    again = LAYERS[kind].from_tensors(q.tensors(), meta)
    with torch.no_grad():
        assert torch.equal(again(x), y)
        assert torch.equal(copy.deepcopy(q)(x), y)  # the packed engine weights survive a deepcopy
    stored = q.tensors()
    assert stored["qweight"].dtype in (torch.int8, torch.uint8)
    if kind == "int4_weight_only":
        assert stored["qweight"].shape == (48, 32)  # two 4-bit weights per byte


def test_int4_packs_every_value_and_embeddings_scale_rows():
    layer = nn.Linear(32, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(64, dtype=torch.float32).view(2, 32))  # 32 distinct steps per row
    q = WeightOnlyInt4Linear.from_float(layer, group_size=32)
    assert torch.allclose(q.dequantized(), layer.weight, atol=float(q.wscale.float().max()) / 2 + 1e-3)
    emb = nn.Embedding(10, 8, padding_idx=0)
    qe = Int8Embedding.from_float(emb)
    ids = torch.tensor([[1, 2, 9]])
    assert torch.allclose(qe(ids), emb(ids), atol=float(emb.weight.abs().max()) / 127)
    assert qe.weight.shape == (10, 8)


def test_skip_patterns_name_layers_by_tail_run_or_glob():
    assert matches("model.layers.0.mlp.down_proj", "down_proj")
    assert matches("lm_head", "lm_head")
    assert matches("bert.encoder.layer.0.attention.self.query", "layer.0.attention")
    assert matches("model.layers.1.self_attn.q_proj", "*.self_attn.*")
    assert not matches("model.layers.10.mlp", "layers.1")
    assert skipped(["a.classifier", "a.dense", "classifier.out"], ["classifier"]) == ["a.classifier",
                                                                                        "classifier.out"]


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


class _Tok:  # what save_quantized asks of a tokenizer
    def save_pretrained(self, folder: str) -> None:
        pass


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int4_weight_only"])
@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_model_reloads_with_the_same_outputs(scheme, tie, tmp_path):
    model = _tiny_llama(tie)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    names, cannot = candidates(model, SCHEMES[scheme], embeddings=True, group_size=32)
    assert not cannot and "lm_head" in names and "model.embed_tokens" in names
    layout = swap(model, names, SCHEMES[scheme], group_size=32)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert 0 < float((before - ref).abs().max()) < 0.2 * float(ref.abs().max())
    save_quantized(model, _Tok(), tmp_path, layout, {"scheme": scheme, "task": "causal_lm", "source": "test"})
    assert not (tmp_path / "model.safetensors").exists()  # plain from_pretrained must not find weights
    again = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    assert type(again.lm_head).__name__ == SCHEMES[scheme].linear.__name__
    assert not any(t.device.type == "meta" for t in again.state_dict().values())


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
def test_a_layer_shared_under_several_names_is_quantized_once(scheme, tiny_t5, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    names, _ = candidates(model, SCHEMES[scheme], embeddings=True, group_size=32)
    assert "shared" in names and "encoder.embed_tokens" not in names  # one table, three names
    layout = swap(model, names, SCHEMES[scheme])
    assert model.encoder.embed_tokens is model.shared is model.decoder.embed_tokens
    assert set(layout["shared"]["aliases"]) >= {"encoder.embed_tokens", "decoder.embed_tokens"}
    save_quantized(model, _Tok(), tmp_path, layout, {"scheme": scheme, "task": "seq2seq"})
    again = load_quantized(tmp_path)
    assert again.encoder.embed_tokens is again.shared is again.decoder.embed_tokens
    ids = torch.tensor([[5, 6, 7, 1]])
    dec = torch.tensor([[0, 5]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=dec).logits,
                           model(input_ids=ids, decoder_input_ids=dec).logits)


def test_a_machine_without_an_int8_engine_is_told_which_schemes_run():
    from lathe.quant.run import check_scheme_runs_here

    with pytest.raises(ConfigError, match=r"int8_dynamic needs an int8 GEMM.*qnnpack.*int8_weight_only"):
        check_scheme_runs_here(SCHEMES["int8_dynamic"], engines=["qnnpack", "none"])
    check_scheme_runs_here(SCHEMES["int4_weight_only"], engines=["qnnpack"])  # float matmuls: run anywhere
    check_scheme_runs_here(SCHEMES["int8_static"])  # this machine (x86-64) has the engine


@pytest.mark.parametrize("keys, message", [
    ({"quantization_scheme": "int8_static"}, "int8_static needs calibration rows"),
    ({"quantization_keep_float": 0.1}, "quantization_keep_float needs calibration rows"),
    ({"quantization_keep_float": 1.5}, "must be a fraction in"),
    ({"quantization_group_size": 64}, "applies to int4_weight_only only"),
    ({"quantization_scheme": "int4_weight_only", "quantization_group_size": 33}, "even number"),
    ({"calibration_samples": 0, "calibration_dataset": "x"}, "calibration_samples: 0"),
    ({"quantization_scheme": "int9"}, "quantization_scheme"),
    ({"output_dir": None}, "needs output_dir"),
])
def test_quantize_keys_are_checked_before_anything_loads(keys, message):
    base = {"model_name_or_path": "m", "output_dir": "out"}
    with pytest.raises(ConfigError, match=message):
        load_config({**base, **keys}, command="quantize")


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only", "int4_weight_only"])
def test_qat_trains_on_exactly_the_weights_the_conversion_stores(scheme):
    from lathe.model.quant.qat import FakeQuantization, round_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    first = model[0].weight
    converted = LAYERS[scheme].from_float(model[0], group_size=32).dequantized()
    assert torch.allclose(round_weight(first.detach(), scheme), converted, atol=1e-6)

    fq = FakeQuantization(scheme, group_size=32)
    assert fq.apply(model) == 2
    assert torch.allclose(model[0].weight, converted, atol=1e-6)  # the forward pass sees the rounded weight
    x = torch.randn(5, 64)
    model(x).pow(2).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0  # straight through to the float weight
    fq.remove()
    assert model[0].weight is first and not hasattr(model[0], "parametrizations")  # the float weight, unrounded
    assert not torch.equal(model[0].weight.detach(), converted)
