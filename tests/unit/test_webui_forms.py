"""The web UI's forms come from the config schema, speak English and Chinese everywhere, and
turn what the page holds into the config the CLI would run (or the CLI's line on a field)."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
import typing

import pytest

from lathe.config.schema import SECTIONS
from lathe.webui import form as forms
from lathe.webui import i18n
from lathe.webui.jobs import Jobs

FIELDS = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
SHOWN = sorted({k for groups in forms.FORMS.values() for _, keys in groups for k in keys})


def test_every_field_is_a_config_key_with_its_schema_default_and_help():
    for form in forms.FORMS:
        spec = forms.form_spec(form, "en")
        for group in spec["groups"]:
            for f in group["fields"]:
                schema = FIELDS[f["key"]]
                assert f["help"] == schema.metadata["help"]
                default = schema.default_factory() if schema.default_factory is not dataclasses.MISSING \
                    else schema.default
                assert f["default"] == forms._shown(default)


def test_field_kinds_follow_the_declared_types():
    spec = {f["key"]: f for g in forms.form_spec("train", "en")["groups"] for f in g["fields"]}
    literal = typing.get_args(typing.get_type_hints(SECTIONS["finetune"])["finetuning_type"])
    assert spec["finetuning_type"]["kind"] == "select" and spec["finetuning_type"]["choices"] == list(literal)
    assert spec["bf16"]["kind"] == "bool" and spec["lora_rank"]["kind"] == "int"
    assert spec["learning_rate"]["kind"] == "float" and spec["dataset"]["kind"] == "list"
    assert spec["quantization_bit"]["nullable"] and spec["stage"]["choices"][:2] == ["pt", "sft"]
    assert spec["lora_rank"]["methods"] == ["lora"] and spec["lora_alpha"]["methods"] == ["lora", "adalora"]
    assert spec["pref_beta"]["stages"] == ["dpo", "kto"] and spec["pref_loss"]["stages"] == ["dpo"]
    assert "chatml" in spec["template"]["suggest"]
    # a bool that may be left unset (Lathe decides) is unset / true / false, not a checkbox
    gc = spec["gradient_checkpointing"]
    assert (gc["kind"], gc["choices"], gc["nullable"], gc["default"]) == ("select", ["true", "false"], True, "")
    assert forms.to_keys("train", {"gradient_checkpointing": ""}) == {}
    assert forms.to_keys("train", {"gradient_checkpointing": "true"}) == {"gradient_checkpointing": True}
    assert forms.to_keys("train", {"gradient_checkpointing": "false"}) == {"gradient_checkpointing": False}


def test_every_word_of_the_page_has_english_and_chinese():
    for key in SHOWN:
        zh_label, zh_help = i18n.KEYS_ZH[key]
        assert zh_label and zh_help and re.search(r"[\u4e00-\u9fff]", zh_label + zh_help), key
        assert i18n.key_label(key, "en")
    for word, (en, zh) in i18n.UI.items():
        assert en and zh, word
    assert set(i18n.KEYS_ZH) <= set(FIELDS), "a translated key the schema does not have"
    page = (forms.__file__.rsplit("/", 1)[0] + "/static/")
    words = set(re.findall(r'data-word="(\w+)"', open(page + "index.html", encoding="utf-8").read()))
    words |= set(re.findall(r'\bw\("(\w+)"\)', open(page + "app.js", encoding="utf-8").read()))
    words |= {f"status_{s}" for s in ("running", "done", "failed", "stopped")}
    words |= {title for groups in forms.FORMS.values() for title, _ in groups}
    assert words - set(i18n.UI) == set()


def test_the_page_values_become_the_keys_a_yaml_would_hold():
    keys = forms.to_keys("train", {"model_name_or_path": "lathe:demo", "dataset": "a, b", "lora_rank": "8",
                                   "learning_rate": "2e-4", "bf16": False, "packing": True, "max_samples": "",
                                   "template": "chatml"}, "warmup_steps: 3\n")
    assert keys == {"model_name_or_path": "lathe:demo", "dataset": ["a", "b"], "learning_rate": 2e-4,
                    "packing": True, "template": "chatml", "warmup_steps": 3}  # defaults and blanks left out
    text = forms.config_yaml(keys)
    assert "learning_rate: 0.0002" in text and "lora_rank" not in text
    with pytest.raises(forms.FormErrors) as e:
        forms.to_keys("train", {}, "a: [1,\n")
    assert list(e.value.errors) == ["_extra"] and "not valid YAML" in e.value.errors["_extra"]
    with pytest.raises(forms.FormErrors):
        forms.to_keys("chat", {"learning_rate": "1"})  # not a field of that form


def test_a_mistake_lands_on_the_field_its_line_names():
    base = {"model_name_or_path": "lathe:demo", "dataset": ["identity"], "output_dir": "runs/x"}
    for key, value in (("lora_rank", 0), ("learning_rate", "fast"), ("template", "nosuch"), ("cutoff_len", 1)):
        with pytest.raises(forms.FormErrors) as e:
            forms.check("train", {**base, key: value})
        assert list(e.value.errors) == [key], e.value.errors
        assert e.value.errors[key].startswith("ConfigError: ")
    with pytest.raises(forms.FormErrors) as e:
        forms.check("train", {**base, "pref_beta": 0.2})  # a dpo key under sft: the line names pref_beta first
    assert list(e.value.errors) == ["pref_beta"]
    assert forms.field_of("output_dir x is used; see lora_rank", ["lora_rank", "output_dir"]) == "output_dir"
    assert forms.field_of("nothing known here", ["lora_rank"]) == forms.EXTRA
    assert forms.check("train", base).data.dataset == ["identity"]


def _wait(job, seconds=120):
    deadline = time.time() + seconds
    while job.status() == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    return job.status()


def test_a_job_is_a_process_of_its_own_with_a_log_and_an_exit_code(tmp_path):
    jobs = Jobs(tmp_path / "ui")
    ok = jobs.start("methods", [], None, None, str(tmp_path))
    assert _wait(ok) == "done" and ok.rc() == 0
    assert "lora:" in ok.log_tail(1000) and ok.log_tail(1000).startswith("$ lathe methods")
    bad = jobs.start("train", ["config.yaml"], "stage: nope\n", "runs/x", str(tmp_path))
    assert _wait(bad) == "failed" and bad.rc() == 2
    assert "ConfigError: stage: nope is not a known stage" in bad.log_tail()
    assert [j.id for j in jobs.all()] == [bad.id, ok.id]  # newest first, read back from the folders
    assert jobs.get(bad.id).record["output"] == "runs/x" and jobs.get("../x") is None
    assert sys.executable in jobs.get(ok.id).record["argv"][0]
