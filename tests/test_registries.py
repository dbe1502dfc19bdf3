"""The stages' registries are the one list of choices: the settings, compose, the chart's values and its schema
offer exactly what they hold, with the same defaults."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from comind import encodings, modes, settings
from comind.aggregators import AGGREGATORS
from comind.encodings import ENCODINGS, PARAMETERS
from comind.registry import Registry
from comind.server_optimizers import SERVER_OPTIMIZERS
from comind.weighting import WEIGHTINGS
from processes import ROOT

CHART = ROOT / "helm" / "comind"

# setting name (COMIND_*, the ps's dataclass field), chart value under ps, registry
STAGES = [("weighting", "weighting", WEIGHTINGS), ("aggregation", "aggregation", AGGREGATORS),
          ("server_optimizer", "serverOptimizer", SERVER_OPTIMIZERS)]
#: Settings left unset by default, whose choice the mode (comind.modes) or worker-level DP (uniform weighting)
#: makes; the others default to the first.
BY_MODE = {"server_optimizer", "weighting"}


def _default(setting: str, registry: Registry) -> str:
    """What compose and the chart pass when not told: the registry's first choice, or nothing."""
    return "" if setting in BY_MODE else registry.names()[0]


@pytest.mark.parametrize("setting, value, registry", STAGES)
def test_the_settings_offer_the_registry_and_default_to_its_first_choice(setting, value, registry: Registry):
    [option] = [o for o in settings.OPTIONS if o.name == setting]
    assert option.choices == registry.names()
    assert option.default == (_default(setting, registry) or None)
    with pytest.raises(ValueError, match=rf"COMIND_{setting.upper()} must be one of {', '.join(registry.names())}"):
        option.convert("no-such-choice", f"COMIND_{setting.upper()}")


@pytest.mark.parametrize("setting, value, registry", STAGES)
def test_the_chart_offers_the_registry(setting, value, registry: Registry):
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["ps"]["properties"][value]
    unset = [""] if setting in BY_MODE else []
    assert schema["enum"] == unset + list(registry.names())
    values = yaml.safe_load((CHART / "values.yaml").read_text())["ps"]
    assert values[value] == _default(setting, registry)
    template = (CHART / "templates" / "ps.yaml").read_text()
    passed = (f"{{{{- with .Values.ps.{value} }}}}\n            - name: COMIND_{setting.upper()}\n              value: "
              f"{{{{ . | quote }}}}" if unset else
              f"- name: COMIND_{setting.upper()}\n              value: {{{{ .Values.ps.{value} | quote }}}}")
    assert passed in template


@pytest.mark.parametrize("setting, value, registry", STAGES)
def test_compose_passes_the_setting_with_the_registry_default(setting, value, registry: Registry):
    compose = (ROOT / "compose.yaml").read_text()
    variable = f"COMIND_{setting.upper()}"
    assert re.search(rf"{variable}: \${{{variable}:-{re.escape(_default(setting, registry))}}}", compose)


def test_federated_mode_defaults_to_the_first_server_optimizer():
    assert SERVER_OPTIMIZERS.names()[0] == modes.FEDERATED_SERVER_OPTIMIZER
    assert modes.DISTRIBUTED_SERVER_OPTIMIZER in SERVER_OPTIMIZERS


def test_a_registry_refuses_a_second_entry_of_the_same_name():
    registry: Registry[int] = Registry("COMIND_EXAMPLE")
    registry.register("one")(1)
    with pytest.raises(ValueError, match="already has a choice named 'one'"):
        registry.register("one")(2)
    assert registry["one"] == 1 and "one" in registry and registry.names() == ("one",)


# The encode stage: `--update-encoding` takes the registry's names, `topk` with a fraction; `--model-encoding` the
# deterministic ones the model may go down as.
ENCODING_SETTINGS = [("update_encoding", "updateEncoding"), ("model_encoding", "modelEncoding")]


def test_the_update_encoding_setting_takes_exactly_the_registrys_encodings():
    [option] = [o for o in settings.OPTIONS if o.name == "update_encoding"]
    for name in ENCODINGS.names():
        given = f"{name}:0.5" if name in PARAMETERS else name
        assert option.convert(given, "COMIND_UPDATE_ENCODING") == encodings.parse(given).name
    assert option.default == ENCODINGS.names()[0] == encodings.FLOAT32
    [model] = [o for o in settings.OPTIONS if o.name == "model_encoding"]
    assert model.choices == encodings.MODEL_ENCODINGS and model.default == encodings.MODEL_ENCODINGS[0]


def test_the_chart_offers_the_encodings():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["ps"]["properties"]
    pattern = re.compile(schema["updateEncoding"]["pattern"])
    for name in ENCODINGS.names():
        assert pattern.match(f"{name}:0.01" if name in PARAMETERS else name)
        assert not pattern.match(name if name in PARAMETERS else f"{name}:0.01")
    assert not pattern.match("int4")
    assert schema["modelEncoding"]["enum"] == list(encodings.MODEL_ENCODINGS)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["ps"]
    template = (CHART / "templates" / "ps.yaml").read_text()
    for setting, value in ENCODING_SETTINGS:
        assert values[value] == encodings.FLOAT32
        passed = f"- name: COMIND_{setting.upper()}\n              value: {{{{ .Values.ps.{value} | quote }}}}"
        assert passed in template


@pytest.mark.parametrize("setting, value", ENCODING_SETTINGS)
def test_compose_passes_the_encodings(setting, value):
    variable = f"COMIND_{setting.upper()}"
    assert re.search(rf"{variable}: \${{{variable}:-{encodings.FLOAT32}}}", (ROOT / "compose.yaml").read_text())
