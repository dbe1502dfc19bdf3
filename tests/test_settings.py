"""comind.settings: one frozen dataclass per role, flag over variable over TF_CONFIG over default."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from comind import config, settings
from comind.settings import LocalSettings, PsSettings, TrainSettings, WorkerSettings
from processes import ROOT

ROLES = {"ps": PsSettings, "worker": WorkerSettings, "train": TrainSettings}
TF_CONFIG = json.dumps({"cluster": {"ps": ["p:3333"], "worker": ["w0:1", "w1:1", "w2:1"]},
                        "task": {"type": "worker", "index": 1}})


@pytest.mark.parametrize("role", ROLES)
def test_each_role_loads_its_own_frozen_dataclass_of_defaults(role):
    loaded = settings.load(role)
    assert type(loaded) is ROLES[role]
    for option in settings.options_of(ROLES[role]):
        if option.name not in ("rounds", "metrics_port", "metrics_host"):  # unset: the role's default
            assert getattr(loaded, option.name) == option.default, option.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.dataset = "cifar10"


def test_local_settings_are_frozen_too():
    local = settings.load("local", {"workers": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        local.workers = 4


def test_flag_beats_variable_beats_tf_config_beats_default():
    environ = {"TF_CONFIG": TF_CONFIG}
    assert settings.load("worker", {}, {}).task_index == 0
    assert settings.load("worker", {}, environ).task_index == 1
    assert settings.load("worker", {}, {**environ, "COMIND_TASK_INDEX": "5"}).task_index == 5
    assert settings.load("worker", {"task_index": "7"}, {**environ, "COMIND_TASK_INDEX": "5"}).task_index == 7
    # An empty variable is no value; an unset flag (None) is no flag.
    assert settings.load("worker", {"task_index": None}, {**environ, "COMIND_TASK_INDEX": ""}).task_index == 1


def test_the_original_flags_are_flags_below_the_new_ones():
    original = {"original_job_name": "worker", "original_task_index": 2, "original_worker_hosts": "a:1,b:1,c:1"}
    assert settings.load("worker", original, {"COMIND_TASK_INDEX": "9"}).task_index == 2
    assert settings.load("worker", {**original, "task_index": "0"}, {}).task_index == 0
    assert settings.load("worker", original, {}).num_workers == 3


def test_rounds_default_to_the_preset_of_the_data_set_and_interval():
    assert settings.load("ps").rounds == settings.load("worker").rounds == 15
    assert settings.load("ps", {}, {"COMIND_DATASET": "cifar10", "COMIND_INTERVAL_STEPS": "1000"}).rounds == 20


def test_a_ps_and_its_workers_on_one_host_have_their_own_metrics_ports_where_they_listen():
    ps = settings.load("ps", {"listen": "127.0.0.1:2222"})
    workers = [settings.load("worker", {"task_index": str(task)}) for task in range(3)]
    assert [ps.metrics_port] + [w.metrics_port for w in workers] == [8000, 8001, 8002, 8003]
    # The ps's metrics only where it listens; a worker listens nowhere, and is scraped from elsewhere.
    assert (ps.metrics_host, workers[0].metrics_host) == ("127.0.0.1", "0.0.0.0")
    assert settings.load("ps").metrics_host == "0.0.0.0"
    assert settings.load("ps", {"listen": "[::1]:1"}).metrics_host == "::1"
    given = {"COMIND_METRICS_PORT": "9100", "COMIND_METRICS_HOST": "10.0.0.5"}
    for role in ("ps", "worker"):
        assert (settings.load(role, {}, given).metrics_port, settings.load(role, {}, given).metrics_host) == \
            (9100, "10.0.0.5")
    with pytest.raises(ValueError, match=r"Worker 64000 has no default metrics port \(it would be 72001\); set "
                                         r"COMIND_METRICS_PORT\. Received: task_index=64000"):
        settings.load("worker", {"task_index": "64000"})


@pytest.mark.parametrize("flags, environ, source", [
    ({"rounds": "0"}, {}, "--rounds must be a positive integer. Received: --rounds='0'"),
    ({}, {"COMIND_ROUNDS": "x"}, "COMIND_ROUNDS must be a positive integer. Received: COMIND_ROUNDS='x'"),
    ({}, {"TF_CONFIG": json.dumps({"cluster": {"ps": ["no-port"]}, "task": {"type": "ps", "index": 0}})},
     "TF_CONFIG must be host:port"),
    ({}, {"COMIND_AGGREGATION": "krum"},
     "COMIND_AGGREGATION must be one of mean, median, trimmed-mean. Received: COMIND_AGGREGATION='krum'"),
])
def test_a_bad_value_names_where_it_came_from(flags, environ, source):
    with pytest.raises(ValueError, match="Received") as error:
        settings.load("ps", flags, environ)
    assert source in str(error.value)


def test_the_role_comes_from_a_flag_a_variable_tf_config_or_the_original_flags():
    assert settings.role_from({}, {}) is None
    assert settings.role_from({}, {"TF_CONFIG": TF_CONFIG}) == "worker"
    assert settings.role_from({}, {"TF_CONFIG": TF_CONFIG, "COMIND_ROLE": "ps"}) == "ps"
    assert settings.role_from({"role": "worker"}, {"COMIND_ROLE": "ps"}) == "worker"
    assert settings.role_from({"original_job_name": "ps", "original_ps_hosts": "p:1"}, {}) == "ps"


def test_choices_are_their_owners():
    from comind import datasets, models, sharding
    from comind.aggregators import AGGREGATORS
    from comind.server_optimizers import SERVER_OPTIMIZERS
    from comind.weighting import WEIGHTINGS

    choices = {o.name: o.choices for o in settings.OPTIONS}
    assert choices["shard"] == sharding.METHODS
    assert choices["aggregation"] == AGGREGATORS.names()
    assert choices["weighting"] == WEIGHTINGS.names()
    assert choices["server_optimizer"] == SERVER_OPTIMIZERS.names()
    assert config.dataset_names() == datasets.NAMES
    assert config.model_names() == models.BUILTIN and all(callable(getattr(models, n)) for n in models.BUILTIN)
    [dataset] = [o for o in settings.OPTIONS if o.name == "dataset"]
    assert all(dataset.convert(name, "x") == name for name in datasets.NAMES)


def test_every_field_has_one_option_whose_default_has_the_field_type():
    for cls in ROLES.values():
        hints = typing.get_type_hints(cls)
        for option in settings.options_of(cls):
            if option.default is not None:
                assert isinstance(option.default, hints[option.name]), option.name
    assert len({o.name for o in settings.OPTIONS}) == len(settings.OPTIONS)


def test_a_setting_declared_twice_is_an_error():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mine:
        dataset: str = settings._setting("digits", "again", config.dataset_name)

    settings._declared_once(PsSettings, WorkerSettings, TrainSettings)
    with pytest.raises(TypeError, match="'dataset' is declared twice"):
        settings._declared_once(PsSettings, Mine)


@pytest.mark.parametrize("role", ROLES)
def test_variables_give_the_same_settings_back(role):
    given = {"COMIND_DATASET": "cifar10", "COMIND_ROUNDS": "3", "COMIND_LOG_LEVEL": "debug"}
    loaded = settings.load(role, {}, given)
    assert settings.load(role, {}, settings.variables(loaded)) == loaded
    assert "COMIND_ROUNDS" not in settings.variables(loaded, leave_out=frozenset({"rounds"}))


def test_local_settings_name_the_workers_and_leave_the_cluster_to_local():
    local = settings.load("local", {"workers": 4}, {"COMIND_NUM_WORKERS": "9", "COMIND_TOKEN": "secret"})
    assert isinstance(local, LocalSettings)
    assert (local.workers, local.ps.num_workers, local.worker.num_workers, local.ps.token) == (4, 4, 4, None)
    assert local.log_level == local.ps.log_level == "info"


def test_settings_and_the_ps_never_import_tensorflow():
    """`comind health` checks every setting, and the ps runs, without TensorFlow (docs/design.md, decision 2)."""
    code = ("import sys\n"
            "from comind import cli, ps_main, ps, service, settings\n"
            "environ = {'COMIND_MODEL': 'basic', 'COMIND_DATASET': 'digits', 'COMIND_SHARD': 'iid',\n"
            "           'COMIND_AGGREGATION': 'median', 'COMIND_WEIGHTING': 'uniform'}\n"
            "for command in ('ps', 'worker', 'local'):\n"
            "    cli._load(cli._parser().parse_args([command]), environ)\n"
            "loaded = settings.load('ps', {'num_workers': '3'})\n"
            "ps_main.server_pipeline(loaded, ps_main.round_policy(loaded))\n"
            "assert not {'keras', 'tensorflow'} & set(sys.modules), sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
