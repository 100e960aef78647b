"""The method registry: one module per finetuning_type, in step with the schema."""

from __future__ import annotations

import subprocess
import sys
import typing

from lathe.config.checks import method_keys
from lathe.config.schema import FinetuneConfig
from lathe.model.methods import MODULES, all_methods, get_method


def test_registry_and_schema_agree():
    names = set(typing.get_args(typing.get_type_hints(FinetuneConfig)["finetuning_type"]))
    assert {m.name for m in all_methods()} == names
    assert len(MODULES) == len(set(MODULES)) < len(names)  # prompt_learning registers three
    assert method_keys("lora")[:4] == ["lora_rank", "lora_alpha", "lora_dropout", "lora_target"]
    assert method_keys("full") == []
    assert "lora_target" in method_keys("adalora") and "num_virtual_tokens" in method_keys("prompt")
    for m in all_methods():  # an adapter method names the peft_type its adapter_config.json records
        assert (m.peft_type is not None) == m.adapter


def test_an_unknown_method_names_the_known_ones():
    import pytest

    from lathe.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean lora"):
        get_method("loar")


def test_lathe_methods_lists_each_method_and_its_keys():
    out = subprocess.run([sys.executable, "-m", "lathe", "methods"], capture_output=True, text=True).stdout
    for m in all_methods():
        assert sum(line.startswith(f"{m.name}: ") for line in out.splitlines()) == 1
        assert all(f"  {k} " in out for k in method_keys(m.name))
    assert "trains on a 4/8-bit base" in out
