"""Settings: flag over variable over TF_CONFIG over default, and errors that say what was wrong."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from comind import cli
from comind.checkpoint import CheckpointStore
from comind.settings import LocalSettings, PsSettings, Settings, WorkerSettings
from comind.tensors import Layout
from processes import ROOT
from scrape import free_port


def ps(*args, env=None):
    return subprocess.run([sys.executable, "-m", "comind", "ps", "--metrics-port", "0", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, env, words", [
    ([], {"COMIND_ROUNDS": "abc"}, "COMIND_ROUNDS must be a positive integer. Received: COMIND_ROUNDS='abc'"),
    (["--rounds", "0"], {}, "--rounds must be a positive integer. Received: --rounds='0'"),
    (["--weighting", "median"], {}, "--weighting must be one of examples, uniform"),
    (["--aggregation", "krum"], {}, "--aggregation must be one of mean, median, trimmed-mean"),
    ([], {"COMIND_TRIM_FRACTION": "0.5"},
     "COMIND_TRIM_FRACTION must be a number from 0 up to, not including, 0.5. Received: COMIND_TRIM_FRACTION='0.5'"),
    (["--max-update-norm", "0"], {}, "--max-update-norm must be a positive"),
    (["--aggregation", "trimmed-mean", "--num-workers", "4", "--trim-fraction", "0.2"], {},
     "trims nothing from rounds of 4 updates"),
    (["--listen", "nonsense:99999"], {}, "--listen must be host:port (a port from 0 to 65535)"),
    (["--listen", "no-such-host.invalid:2222"], {}, "Cannot listen on 'no-such-host.invalid:2222'"),
    (["--token-file", "/nonexistent/token"], {}, "Cannot read the token file"),
    (["--tls-cert", "/nonexistent/cert"], {}, "COMIND_TLS_CERT and COMIND_TLS_KEY"),
])
def test_bad_settings_fail_at_once_naming_the_setting(args, env, words):
    result = ps(*args, env=env)
    assert result.returncode == 2
    assert words in result.stderr


def test_metrics_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        result = ps("--metrics-port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "Cannot serve metrics on port" in result.stderr and "Traceback" not in result.stderr


def test_flag_beats_variable_beats_default():
    values = settings("ps", "--rounds", "7", env={"COMIND_ROUNDS": "9", "COMIND_LEASE_SECONDS": "2.5"})
    assert values.rounds == 7 and values.lease_seconds == 2.5 and values.num_workers == 2


def settings(command: str, *args: str, env: dict | None = None) -> Settings:
    flags = cli._parser().parse_args([command, *args])
    return cli._load(flags, env or {})


TF_CONFIGS = {
    "list": {"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"], "ps": ["p:2222"]},
             "task": {"type": "worker", "index": 1}, "environment": "cloud"},
    "map": {"cluster": {"chief": {"0": "c:2222"}, "worker": {"1": "w1:2222", "0": "w0:2222"},
                        "ps": {"0": "p:2222"}}, "task": {"type": "worker", "index": 1}},
}


@pytest.mark.parametrize("form", TF_CONFIGS)
def test_tf_config_as_a_tfjob_writes_it(form):
    worker = settings("run", env={"TF_CONFIG": json.dumps(TF_CONFIGS[form])})
    assert (worker.ps_address, worker.task_index, worker.num_workers) == ("p:2222", 2, 3)
    chief = dict(TF_CONFIGS[form], task={"type": "chief", "index": 0})
    assert settings("run", env={"TF_CONFIG": json.dumps(chief)}).task_index == 0
    ps = dict(TF_CONFIGS[form], task={"type": "ps", "index": 0})
    assert settings("run", env={"TF_CONFIG": json.dumps(ps)}).listen == "0.0.0.0:2222"


def test_run_and_health_load_the_settings_of_the_role_they_are_given():
    tf_config = json.dumps(TF_CONFIGS["list"])
    assert isinstance(settings("run", env={"TF_CONFIG": tf_config}), WorkerSettings)
    assert isinstance(settings("health", env={"COMIND_ROLE": "ps"}), PsSettings)
    assert isinstance(settings("run", "--role", "ps", env={"TF_CONFIG": tf_config}), PsSettings)
    assert settings("certificates", "--out", "x") is None


def test_local_has_the_ps_and_worker_settings_and_sets_the_cluster_ones_itself(monkeypatch):
    from comind.local import _environment

    local = settings("local", "--workers", "3", "--shard", "iid", env={"COMIND_LISTEN": "not an address",
                                                                      "COMIND_TOKEN": "t", "COMIND_ROUNDS": "4"})
    assert isinstance(local, LocalSettings) and local.workers == 3
    assert local.ps.num_workers == local.worker.num_workers == 3 and local.ps.rounds == local.worker.rounds == 4
    assert (local.ps.listen, local.ps.token, local.worker.shard) == ("127.0.0.1:0", None, "iid")
    monkeypatch.setenv("COMIND_TOKEN_FILE", "token")
    monkeypatch.setenv("TF_CONFIG", "{}")
    environment = _environment(local)
    assert (environment["COMIND_NUM_WORKERS"], environment["COMIND_ROUNDS"], environment["COMIND_SHARD"],
            environment["COMIND_AGGREGATION"]) == ("3", "4", "iid", "mean")
    assert len(environment["COMIND_TOKEN"]) == 32
    assert not {"COMIND_TOKEN_FILE", "COMIND_LISTEN", "COMIND_PS_ADDRESS", "COMIND_TASK_INDEX", "TF_CONFIG"} & \
        environment.keys()
    with pytest.raises(ValueError, match=r"--workers must be at least 1\. Received: --workers=0"):
        settings("local", "--workers", "0")


def local_refusal(*args: str) -> str:
    """What `comind local` says when it refuses ``args``, checking that it refused before importing TensorFlow."""
    code = ("import sys\n"
            "from comind import cli\n"
            f"try:\n    cli.main(['local', *{list(args)!r}])\n"
            "except SystemExit as exit:\n    assert exit.code == 2, exit.code\n"
            "assert not {'tensorflow', 'keras'} & set(sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_local_refuses_bad_settings_before_importing_tensorflow():
    assert "trims nothing from rounds of 4 updates" in local_refusal("--workers", "4", "--aggregation",
                                                                     "trimmed-mean", "--trim-fraction", "0.2")
    assert re.search(r"10000 workers cannot run on this machine: each is a process with TensorFlow that needs at "
                     r"least 512 MB, and its \d+ GB hold \d+\. .* Received: --workers=10000",
                     local_refusal("--workers", "10000"))


def test_local_warns_of_more_workers_than_cores(caplog):
    from comind.local import check_workers

    cores = os.cpu_count() or 1
    check_workers(cores)
    assert not caplog.records
    check_workers(cores + 1)
    assert f"{cores + 1} workers share {cores} cores" in caplog.text


def test_local_says_which_metrics_port_is_taken_and_what_to_set(tmp_path):
    base = free_port(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 2))
        taken.listen()
        stderr = local_refusal("--metrics-port", str(base), "--output-dir", str(tmp_path))
    assert f"Cannot serve worker 1's metrics on port {base + 2} of '127.0.0.1' (Address already in use)" in stderr
    assert "set COMIND_METRICS_PORT to the first of 3 free ports" in stderr
    assert not (tmp_path / "logs").exists()  # nothing started


def test_local_relays_the_ps_refusal_of_its_settings_in_one_line(tmp_path):
    stderr = local_refusal("--metrics-port", "0", "--checkpoint-dir", "/dev/null/x", "--output-dir", str(tmp_path))
    assert "The ps refused its settings: Cannot write checkpoints to /dev/null/x" in stderr


def test_variables_and_flags_win_over_tf_config():
    tf_config = json.dumps(TF_CONFIGS["list"])
    assert settings("run", env={"TF_CONFIG": tf_config, "COMIND_TASK_INDEX": "5"}).task_index == 5
    assert settings("run", "--task-index", "7", env={"TF_CONFIG": tf_config}).task_index == 7


def test_original_flags():
    worker = settings("run", "--job_name", "worker", "--task_index", "1", "--ps_hosts", "ps0:2222",
                      "--worker_hosts", "w0:2222,w1:2222,w2:2222")
    assert (worker.ps_address, worker.task_index, worker.num_workers) == ("ps0:2222", 1, 3)
    ps = settings("run", "--job_name", "ps", "--ps_hosts", "ps0:2345", "--worker_hosts", "w0:1,w1:1")
    assert ps.listen == "0.0.0.0:2345" and ps.num_workers == 2


def test_rounds_follow_the_preset_and_interval():
    assert settings("ps").rounds == 15  # digits: 1500 local steps in rounds of 100
    assert settings("ps", "--interval-steps", "1").rounds == 1500
    assert settings("ps", "--rounds", "3").rounds == 3


@pytest.mark.parametrize("command, env, words", [
    ("run", {}, "comind run needs a role: set COMIND_ROLE"),
    ("run", {"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
    ("run", {"TF_CONFIG": '{"cluster": {"worker": "w0:1"}, "task": {"type": "worker"}}'}, "job 'worker' must be"),
    ("run", {"COMIND_ROLE": "evaluator"}, "COMIND_ROLE must be one of ps, worker. Received: COMIND_ROLE='evaluator'"),
    ("worker", {"COMIND_PS_ADDRESS": "no-port"}, "COMIND_PS_ADDRESS must be host:port"),
    ("worker", {"COMIND_DATASET": "mnist"}, "COMIND_DATASET must be one of digits, fashion_mnist, cifar10, or a path"),
    ("worker", {"COMIND_MODEL": "resnet"}, "COMIND_MODEL must be one of basic, advanced, or module:function"),
    ("worker", {"COMIND_MODEL": "no_such_module:build"}, "Cannot import the model's module 'no_such_module'"),
    ("train", {"COMIND_DATASET": "/nonexistent/data.npz"}, "/nonexistent/data.npz"),
    ("ps", {"COMIND_METRICS_PORT": "70000"},
     "COMIND_METRICS_PORT must be a port from 0 to 65535. Received: COMIND_METRICS_PORT='70000'"),
])
def test_bad_configuration_fails_at_once_with_what_was_wrong(command, env, words):
    result = subprocess.run([sys.executable, "-m", "comind", command], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COMIND_METRICS_PORT": "0", **env}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def fashion_shaped(path, spoil):
    """A small data set shaped as Fashion-MNIST (28x28 floats, 10 classes), spoilt by ``spoil(arrays)``."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((64, 28, 28), np.float32), "y_train": np.arange(64) % 10,
              "x_test": rng.random((16, 28, 28), np.float32), "y_test": np.arange(16) % 10}
    spoil(arrays)
    np.savez(path, **arrays)
    return path


BAD_DATA = {
    "NaN": (lambda arrays: arrays["x_train"].__setitem__((3, 5, 7), np.nan),
            "x_train in {} holds 1 NaN or Inf value(s), the first at x_train[3, 5, 7]"),
    "test label past the classes": (lambda arrays: arrays["y_test"].__setitem__(4, 50),
                                    "y_test in {} holds the label 50 (at index 4), but the labels of y_train go "
                                    "from 0 to 9"),
    "no test examples": (lambda arrays: arrays.update(x_test=arrays["x_test"][:0], y_test=arrays["y_test"][:0]),
                         "x_test and y_test in {} hold no examples"),
}


@pytest.mark.parametrize("command, problem", [("train", "NaN"), ("train", "test label past the classes"),
                                              ("train", "no test examples"), ("local", "NaN")])
def test_bad_data_fails_at_once_in_one_line_naming_the_array(tmp_path, command, problem):
    """Before: NaN trained to a NaN loss with exit 0 (and in local, the ps blamed the learning rate); a test label
    of 50 made a 51-class model; no test examples ended in a traceback."""
    spoil, words = BAD_DATA[problem]
    path = fashion_shaped(tmp_path / "data.npz", spoil)
    result = subprocess.run([sys.executable, "-m", "comind", command, "--dataset", str(path), "--output-dir",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COMIND_METRICS_PORT": "0"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"comind {command}: error: {words.format(path)}"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_worker_whose_model_differs_from_the_ps_model_stops_with_the_difference(start_ps, tmp_path):
    store = CheckpointStore(tmp_path)
    other = [np.zeros((64, 10), np.float32)]
    store.save(4, Layout.of(other), Layout.of(other).pack(other))
    ps = start_ps("--checkpoint-dir", str(tmp_path), "--num-workers", "1")
    result = subprocess.run([sys.executable, "-m", "comind", "worker", "--ps-address", ps.address], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "COMIND_METRICS_PORT": "0"},
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "does not match the ps's global model: expected 1 tensors, got 4" in result.stderr


def test_certificates_are_kept_on_a_second_run_and_missing_ones_are_named(tmp_path):
    def certificates(workers: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "comind", "certificates", "--out", str(tmp_path), "--workers",
                               str(workers)], cwd=ROOT, capture_output=True, text=True, timeout=60)

    first = certificates(1)
    assert first.returncode == 0 and (tmp_path / "worker-0.pem").exists(), first.stderr
    again = certificates(1)
    assert again.returncode == 0 and "kept them" in again.stdout
    more = certificates(3)
    assert more.returncode == 2
    assert "none for worker-1, worker-2, and its CA's key is gone" in more.stderr and "Traceback" not in more.stderr


def on_a_terminal(*args: str) -> tuple[int, str]:
    """Runs ``comind ARGS`` with a pseudo-terminal as its stdout and stderr; returns its status and what it showed."""
    import pty

    terminal, its_side = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "comind", *args], stdin=subprocess.DEVNULL, stdout=its_side,
                               stderr=its_side, cwd=ROOT)
    os.close(its_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the process closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    return process.wait(timeout=120), shown.decode(errors="replace")


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_tensorflow_start_up_lines_stay_off_the_terminal_unless_debugging(tmp_path, log_level):
    status, shown = on_a_terminal("train", "--steps", "1", "--output-dir", str(tmp_path), "--log-level", log_level)
    assert status == 0, shown
    assert "Final test accuracy" in shown
    assert ("absl::InitializeLog" in shown and "oneDNN" in shown) == (log_level == "debug"), shown
