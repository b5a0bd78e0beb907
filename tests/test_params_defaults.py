"""params.yaml and the config dataclasses say the same thing (issue 16 item 2).

The dataclass defaults are the source of truth: a run without params.yaml (a library call, a test,
a fresh section) must train the documented recipe. params.yaml spells every knob out for DVC (a stage
depends on its section) and for readers, so every value it writes must equal the default; a
difference fails here, naming the field to change.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import from_dict, read_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"

# section -> (module, dataclass): what `load_section(cls, section, ...)` reads it into
SECTIONS = {
    "base": ("pipeline.config", "BaseConfig"),
    "gate": ("pipeline.evaluate.gate", "GateConfig"),
    "registry": ("pipeline.registry", "RegistryConfig"),
    "model_init": ("pipeline.model.presets", "ModelInitConfig"),
    "orchestrate": ("flows.runner", "OrchestrateConfig"),
    "notify": ("flows.notify", "NotifyConfig"),
    "generate_clevr": ("pipeline.data.clevr_policy", "GenerateClevrConfig"),
    "validate": ("validation.clevr", "ValidateConfig"),
    "rl": ("pipeline.train.rl_config", "RLConfig"),
    "evaluate": ("pipeline.evaluate.suites", "EvalConfig"),
    "generate_gta": ("pipeline.data.gta_policy", "GenerateGtaConfig"),
    "cpt": ("pipeline.train.cpt", "CPTConfig"),
    "sft": ("pipeline.train.sft", "SFTConfig"),
    "direct_sft": ("pipeline.train.sft", "DirectSFTConfig"),
    "generate_generic": ("pipeline.data.generic_qa", "GenerateGenericConfig"),
    "train_base": ("pipeline.train.base", "BaseTrainConfig"),
}
NOT_CODE = {"ablations"}  # read only by dvc.yaml's templating (${ablations...}), never by a dataclass


def config_class(section: str):
    import importlib

    module, name = SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def test_every_section_has_a_dataclass():
    assert set(read_params(PARAMS)) - NOT_CODE == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_value_in_params_yaml_is_the_dataclass_default(section):
    cls = config_class(section)
    written = read_params(PARAMS)[section]
    loaded, default = from_dict(cls, written, PARAMS, section), cls()
    differ = [f"{section}.{f.name}: params.yaml {getattr(loaded, f.name)!r}, {cls.__name__} default "
              f"{getattr(default, f.name)!r}" for f in dataclasses.fields(cls)
              if getattr(loaded, f.name) != getattr(default, f.name)]
    assert not differ, "change the default in the dataclass and params.yaml together:\n" + "\n".join(differ)


def test_direct_sft_is_sft_but_for_what_it_changes():
    """The answer-only baseline repeats none of sft's knobs: a YAML merge in params.yaml, a subclass in code."""
    from pipeline.train.sft import DirectSFTConfig, SFTConfig

    text = PARAMS.read_text()
    assert "sft: &sft" in text and "<<: *sft" in text
    params = read_params(PARAMS)
    assert set(params["sft"]) <= set(params["direct_sft"])  # the merge brought every sft key along
    assert issubclass(DirectSFTConfig, SFTConfig)
    own = {f.name for f in dataclasses.fields(DirectSFTConfig)
           if getattr(DirectSFTConfig(), f.name) != getattr(SFTConfig(), f.name)}
    assert own == {"epochs", "max_steps", "data_file", "policy_share"}  # its own budget, and no policy
    block = text.split("\ndirect_sft:", 1)[1].split("\n\n", 1)[0]
    written = {line.split(":")[0].strip() for line in block.splitlines()[1:] if line.strip()}
    assert written == {"<<", *own}  # nothing else is written twice
