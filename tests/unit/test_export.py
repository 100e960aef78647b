"""`lathe export`: merged weights that plain transformers loads, with the training template.

The exports here merge a LoRA adapter trained for 2 steps on the tiny model (or re-save a
full fine-tuning run) and are reloaded with plain transformers/peft to check the claims
the verification report makes, independently of it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from lathe.config.load import load_config
from lathe.data.conversation import Conversation, Message
from lathe.data.template_jinja import jinja_literal, template_to_jinja
from lathe.data.templates import TEMPLATES, Template, get_template
from lathe.demo.build import CHATML_JINJA, build_tokenizer
from lathe.errors import ModelError, OutputError
from lathe.export import REPORT, export_dtype, run_export, save_weights, verify_export

# --- template_to_jinja: every named template, without a model -----------------------------

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>"]
RICH_TOKENS = ["<s>", "</s>", "<think>", "</think>", "<start_of_turn>", "<end_of_turn>", "<|user|>",
               "<|assistant|>", "<|system|>", "<|observation|>", "<|end|>", "[gMASK]", *LLAMA3_TOKENS]


@functools.cache
def _tokenizer(kind: str):
    """plain: the demo's (no bos, eos <|im_end|>); rich: bos <s>, eos </s>, the families' tokens."""
    if kind == "plain":
        return build_tokenizer(600)
    tok = build_tokenizer(600, RICH_TOKENS)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return tok


SYSTEM = "You are terse.\nAnswer in one line."
CHATS = [
    (("Hi there", "Hello! How can I help?"), ("Who are you?", "I am Lathe Assistant.")),
    (("Café ☕ {content} {eos} '\\' \"q\" {% raw %}", "  Byte pairs.\n"), ("  Split?  \n", " Sometimes.\n")),
    (("2+2?", "<think>\nadd them\n</think>\n\n4"), ("3+3?", "<think>\nadd again\n</think>\n\n6")),
]


def _messages(conv: Conversation) -> list[dict]:
    role = {"user": "user", "assistant": "assistant", "observation": "tool", "function": "assistant"}
    head = [{"role": "system", "content": conv.system}] if conv.system else []
    return head + [{"role": role[m.role], "content": m.content} for m in conv.messages]


def _conv(pairs, system=None) -> Conversation:
    return Conversation(tuple(Message(r, t) for p in pairs for r, t in zip(("user", "assistant"), p)), system=system)


def _apply(tok, messages, generation: bool, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                        return_dict=False, **kw))


def _full(template, tok, conv) -> list[int]:
    return [t for p, r in template.encode_turns(conv, tok) for t in p + r]


def _assert_renders_like(template: Template, tok) -> None:
    """apply_chat_template(tok) == the template's own ids: whole conversations and generation prompts."""
    for pairs in CHATS:
        for system in (None, SYSTEM, "  padded system \n"):
            conv = _conv(pairs, system)
            assert _apply(tok, _messages(conv), False) == _full(template, tok, conv), (template.name, pairs, system)
            prompt = template.encode_prompt(list(pairs[:-1]), pairs[-1][0], tok, system=system)
            assert _apply(tok, _messages(conv)[:-1], True) == prompt, (template.name, pairs, system)


@pytest.mark.parametrize("kind", ["plain", "rich"])
@pytest.mark.parametrize("name", [n for n in TEMPLATES.names() if n != "auto"])
def test_generated_jinja_renders_every_named_template_token_for_token(name, kind):
    import copy

    tok = copy.deepcopy(_tokenizer(kind))
    template = get_template(name)
    tok.chat_template = template_to_jinja(template, tok)
    _assert_renders_like(template, tok)
    # tool schemas (a list) and tool turns, as a list-valued tools column is rendered in training
    tools = [{"name": "weather", "parameters": {"city": "string"}}]
    conv = Conversation((Message("user", "Weather in Paris?"), Message("function", '{"name": "weather"}'),
                         Message("observation", '{"temp": 21}'), Message("assistant", "It is 21.")),
                        system="Be brief.", tools=json.dumps(tools, ensure_ascii=False))
    assert _apply(tok, _messages(conv), False, tools=tools) == _full(template, tok, conv)


def test_generated_jinja_keeps_awkward_format_text_literal():
    tok = _tokenizer("rich")
    odd = Template(name="odd", prefix="{bos}{% raw %}", system="<sys '{content}' \\n>\n",
                   user="Q{idx}: \"{content}\" {{ x }}\tA:", assistant=" {content}{eos}{tools}",
                   separator="\r\n", default_system="It's {default}", strip_content=True, suffix="%}")
    tok.chat_template = template_to_jinja(odd, tok)
    _assert_renders_like(odd, tok)
    assert jinja_literal("a'b\\c\nd") == "'a\\'b\\\\c\\nd'"


def test_auto_template_keeps_the_tokenizers_own_jinja():
    tok = _tokenizer("plain")
    assert template_to_jinja(get_template("auto"), tok) == CHATML_JINJA


# --- exports of a trained adapter ---------------------------------------------------------

def _train_args(tiny_model, data_dir, out: Path, **extra) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 128, "max_samples": 16, "per_device_train_batch_size": 8,
            "learning_rate": 5e-3, "max_steps": 2, "logging_steps": 1, "save_steps": 1000,
            "output_dir": str(out), "seed": 0, "report_to": "none", **extra}


@pytest.fixture(scope="module")
def adapter(tiny_model, data_dir, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 2 steps with template chatml (recorded in its config.yaml)."""
    import lathe

    out = tmp_path_factory.mktemp("adapter") / "run"
    lathe.train(_train_args(tiny_model, data_dir, out))
    return out


def _export(tiny_model, adapter, out: Path, **keys) -> dict:
    args = {"model_name_or_path": str(tiny_model), "export_dir": str(out), **keys}
    if adapter is not None:
        args["adapter_name_or_path"] = str(adapter)
    return run_export(load_config(args, command="export"))


@pytest.fixture(scope="module")
def chatml_export(tiny_model, adapter, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exports") / "chatml"
    return out, _export(tiny_model, adapter, out)  # template not set: read from the adapter's run


def _reference_logits(tiny_model, adapter, ids, dtype=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        live = model(input_ids=torch.tensor([ids])).logits[0].float()
        with model.disable_adapter():
            plain = model(input_ids=torch.tensor([ids])).logits[0].float()
    return live, plain


def test_export_merges_the_adapter_and_plain_transformers_reloads_it(tiny_model, adapter, chatml_export):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, result = chatml_export
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", REPORT} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert result["template"] == "chatml" and result["dtype"] == "float32"  # from the run's config.yaml; auto

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.float32
    template = get_template("chatml")
    ids = template.encode_prompt([("Hi", "Hello!")], "Who are you?", tok, system="Be kind.")
    with torch.no_grad():
        merged = model(input_ids=torch.tensor([ids])).logits[0]
    live, plain = _reference_logits(tiny_model, adapter, ids)
    assert (merged - live).abs().max() < 1e-4  # base + adapter, unmerged
    assert (merged - plain).abs().max() > 0.05  # and not the base model: the adapter is in there

    assert _apply(tok, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}],
                  True) == ids
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    report = json.loads((out / REPORT).read_text())
    assert report["passed"] is True and report["chat_template_matches"] is True and report["mismatch"] is None
    assert report["max_abs_logit_diff"] < report["bound"] <= 1e-4 * max(1, report["max_abs_logit"])
    assert report["last_adapter_effect"] > 10 * report["bound"]
    assert report["eos_token_ids"] == report["stop_token_ids"] == [tok.eos_token_id]
    assert report["chat_template_checks"] == 8 and report["dtype"] == "float32"
    assert result["verification"] == report


def test_verification_fails_when_the_reference_or_template_differs(tiny_model, adapter, chatml_export):
    """The checks can fail: the same export against the base model alone, another template,
    other stop tokens."""
    from lathe.model.load import load_tokenizer

    out, _ = chatml_export
    cfg = load_config({"model_name_or_path": str(tiny_model), "export_dir": str(out)}, command="export")
    tok = load_tokenizer(cfg.model, str(tiny_model))
    report = verify_export(cfg, out, tok, get_template("llama3"), [7], "float32", str(tiny_model))
    assert report["passed"] is False
    assert report["max_abs_logit_diff"] > report["bound"]  # base only: the adapter's effect shows
    assert report["chat_template_matches"] is False and "first difference at token 0" in report["mismatch"]
    assert report["eos_matches"] is False and len(report["problems"]) == 3


def test_user_template_half_precision_and_legacy_bin(tiny_model, adapter, tmp_path):
    """template set by the user wins over the run's (mistral: system inside the first [INST]);
    float16 weights written as pytorch_model.bin."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "mistral"
    result = _export(tiny_model, adapter, out, template="mistral", export_dtype="float16",
                     export_legacy_format=True)
    names = {p.name for p in out.iterdir()}
    assert "pytorch_model.bin" in names and not [n for n in names if n.endswith(".safetensors")]
    assert result["template"] == "mistral" and result["verification"]["passed"]
    assert result["verification"]["max_abs_logit_diff"] < result["verification"]["bound"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float16
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.decode(_apply(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], True))
    assert text == " [INST] S\n\nQ [/INST]"
    ids = get_template("mistral").encode_prompt([], "Q", tok, system="S")
    live, _ = _reference_logits(tiny_model, adapter, ids, dtype=torch.float16)
    with torch.no_grad():
        merged = model(input_ids=torch.tensor([ids])).logits[0].float()
    assert (merged - live).abs().max() <= result["verification"]["bound"]


def test_bfloat16_with_template_auto_keeps_the_tokenizers_jinja(tiny_model, adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "auto"
    result = _export(tiny_model, adapter, out, template="auto", export_dtype="bfloat16")
    report = result["verification"]
    assert report["passed"] and report["dtype"] == "bfloat16" and report["dtype_noise"] > 0
    assert report["max_abs_logit_diff"] < report["bound"] < report["last_adapter_effect"]
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML_JINJA


def test_refuses_a_used_export_dir_and_writes_nothing(tiny_model, adapter, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds files"):
        _export(tiny_model, adapter, out)
    assert [p.name for p in tmp_path.iterdir()] == ["used"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_empty_export_dir_is_used(tiny_model, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = _export(tiny_model, None, out, template="chatml", export_verify=False)
    assert result["verification"] is None and not (out / REPORT).exists()
    assert (out / "model.safetensors").is_file()


# --- other bases: a full fine-tuning run, a llama3-style tokenizer -----------------------------

def test_full_finetuning_run_exports_with_its_recorded_template(tiny_model, data_dir, tmp_path):
    import lathe

    run = tmp_path / "full"
    lathe.train(_train_args(tiny_model, data_dir, run, template="llama2", finetuning_type="full"))
    out = tmp_path / "export"
    result = run_export(load_config({"model_name_or_path": str(run), "export_dir": str(out)}, command="export"))
    assert result["template"] == "llama2" and result["verification"]["passed"]
    assert result["verification"]["last_adapter_effect"] is None  # nothing to merge: a re-save
    assert result["verification"]["max_abs_logit_diff"] == 0.0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "  Q "}]
    assert tok.decode(_apply(tok, msgs, True)) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST]"


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has Llama 3's special tokens, bos and end_of_text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(512, LLAMA3_TOKENS)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    out = tmp_path_factory.mktemp("llama3") / "base"
    model.to(torch.bfloat16).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_llama3_stop_tokens_become_the_eos_list_and_bos_is_rendered(llama3_model, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "llama3"
    result = _export(llama3_model, None, out, template="llama3")
    assert result["dtype"] == "bfloat16"  # auto: what the base checkpoint records
    tok = AutoTokenizer.from_pretrained(str(out))
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == stops
    assert result["verification"]["passed"] and result["verification"]["eos_token_ids"] == stops
    ids = _apply(tok, [{"role": "user", "content": "Hi"}], True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_export_dtype_auto_reads_the_base_checkpoint(tmp_path):
    for recorded, expected in (("bfloat16", "bfloat16"), ("float16", "float16"), (None, "float32")):
        folder = tmp_path / str(recorded)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": recorded}))
        cfg = load_config({"model_name_or_path": str(folder), "export_dir": str(tmp_path / "x")}, command="export")
        assert export_dtype(cfg, str(folder)) == expected
    cfg = load_config({"model_name_or_path": str(folder), "export_dir": "x", "export_dtype": "float16"},
                      command="export")
    assert export_dtype(cfg, str(folder)) == "float16"


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "bin"])
def test_save_weights_shards_and_reloads(tiny_model, tmp_path, legacy):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    files = save_weights(model, tmp_path, "40KB", legacy=legacy)
    shards = [f for f in files if not f.endswith(".json")]
    suffix = ".bin" if legacy else ".safetensors"
    assert len(shards) > 2 and all(f.endswith(suffix) for f in shards)
    index = json.loads((tmp_path / f"{'pytorch_model.bin' if legacy else 'model.safetensors'}.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_hub_push_offline_is_one_line_and_keeps_the_export(tiny_model, tmp_path):
    out = tmp_path / "pushed"
    with pytest.raises(OutputError) as err:
        _export(tiny_model, None, out, template="chatml", export_verify=False, export_hub_model_id="me/model")
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "\n" not in str(err.value)
    assert (out / "model.safetensors").is_file()


def test_failed_verification_exits_with_model_error_and_keeps_files(tiny_model, adapter, tmp_path, monkeypatch):
    import lathe.export as export

    monkeypatch.setitem(export.RELATIVE_BOUND, "float32", 0.0)  # no difference can pass
    out = tmp_path / "strict"
    with pytest.raises(ModelError, match=f"failed verification.*{REPORT}"):
        _export(tiny_model, adapter, out)
    assert json.loads((out / REPORT).read_text())["passed"] is False
    assert (out / "model.safetensors").is_file()
