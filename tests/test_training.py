"""The training side end to end: real processes, real Keras, the embedded digits."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from events import tensorboard_scalars
from processes import ROOT

ENV = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def comind(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comind", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def final_accuracy(output: Path) -> float:
    return json.loads((output / "metrics.json").read_text())["final"]["eval_accuracy"]


#: `comind local` runs on the embedded digits that several tests read.
LOCAL_RUNS = {"federated": [], "distributed": ["--interval-steps", "1", "--rounds", "300"]}
#: A line of the ps's for a round, as the console shows it.
ROUND_LINE = re.compile(r"Round (\d+)/(\d+): 2 updates, (\d+) examples, loss ([\d.]+), accuracy ([\d.]+)\.")


@pytest.fixture(scope="module", params=LOCAL_RUNS)
def local_run(request, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A finished `comind local --workers 2` run, and its output folder."""
    output = tmp_path_factory.mktemp(request.param)
    result = comind("local", "--workers", "2", "--output-dir", str(output), *LOCAL_RUNS[request.param])
    assert result.returncode == 0, result.stdout + result.stderr
    return result, output


def test_local_cluster_trains_the_embedded_digits(local_run):
    result, output = local_run
    rounds = int(re.findall(r"Round \d+/(\d+)", result.stdout)[0])
    assert re.search(rf"Round {rounds}/{rounds}: 2 updates", result.stdout)
    assert "Final test accuracy" in result.stdout
    assert final_accuracy(output) >= 0.90
    # Each update weighs the worker's training examples (McMahan et al.), not the examples an interval processed.
    logs = output / "logs"
    shards = [int(re.search(r"Worker \d+: (\d+) training examples", (logs / f"worker-{task}.log").read_text())
                  .group(1)) for task in range(2)]
    weights = {int(n) for n in re.findall(r"Round \d+/\d+: 2 updates, (\d+) examples", result.stdout)}
    assert weights == {sum(shards)}, (shards, weights)
    for name in ("model.keras", "predictions.png", "history.png"):
        assert (output / name).stat().st_size > 1000
    assert not list(output.glob("*.tmp*"))


def test_local_shows_the_lines_of_about_100_rounds_and_the_log_has_all(local_run):
    """--interval-steps 1 printed a line for each of 1,500 rounds, and as many evaluations."""
    result, output = local_run
    from comind.local import SHOWN_ROUNDS

    total = int(ROUND_LINE.search(result.stdout).group(2))
    every = math.ceil(total / SHOWN_ROUNDS)
    expected = sorted({1, total, *range(every, total + 1, every)})
    assert [int(line[0]) for line in ROUND_LINE.findall(result.stdout)] == expected
    evaluated = [int(r) for r in re.findall(r"Round (\d+) evaluation", result.stdout)]
    assert evaluated and set(evaluated) <= set(expected)
    assert len(ROUND_LINE.findall((output / "logs" / "ps.log").read_text())) == total


def test_metrics_json_has_the_round_figures_the_console_printed(local_run):
    """metrics.json had the chief's own running figures as "train" (1.0 where the round's line said 0.9688)."""
    result, output = local_run
    records = {r["round"]: r for r in json.loads((output / "metrics.json").read_text())["rounds"]}
    printed = ROUND_LINE.findall(result.stdout)
    assert printed
    for round, _, _, loss, accuracy in printed:
        record = records[int(round)]
        assert (f"{record['train_loss']:.4f}", f"{record['train_accuracy']:.4f}") == (loss, accuracy), round


#: The chief's TensorBoard tags and the metrics.json fields they show (no worker-level DP here: no epsilon).
TENSORBOARD_TAGS = {"train/loss": "train_loss", "train/accuracy": "train_accuracy", "test/loss": "eval_loss",
                    "test/accuracy": "eval_accuracy", "round/seconds": "round_seconds"}
#: With a ps: its server optimizer's learning rate too.
PS_TAGS = {**TENSORBOARD_TAGS, "server/learning_rate": "server_learning_rate"}


def chief_tensorboard(output: Path, tags: dict[str, str] = PS_TAGS) -> tuple[list[dict], dict[str, dict[int, float]]]:
    """metrics.json's rounds and the chief's TensorBoard run, checked to hold the same figures."""
    records = json.loads((output / "metrics.json").read_text())["rounds"]
    chief = tensorboard_scalars(output / "tensorboard")
    assert set(chief) == set(tags)
    for tag, field in tags.items():
        assert chief[tag] == {r["round"]: np.float32(r[field]) for r in records if r[field] is not None}, tag
    return records, chief


def test_tensorboard_has_the_figures_of_metrics_json_and_each_workers_local_loss(local_run):
    result, output = local_run
    records, chief = chief_tensorboard(output)
    total = int(ROUND_LINE.search(result.stdout).group(2))
    assert [r["round"] for r in records] == list(range(1, total + 1))
    assert len(chief["train/loss"]) == len(chief["round/seconds"]) == len(chief["server/learning_rate"]) == total
    assert chief["test/loss"]  # every round, or about 100 of a longer run
    # Each worker's local figures, once per round at its local step count; the round's loss is their mean.
    local = [tensorboard_scalars(output / "tensorboard" / f"worker-{task}") for task in range(2)]
    for figures in local:
        assert set(figures) == {"local/loss", "local/accuracy"}
        steps = sorted(figures["local/loss"])
        assert steps == [steps[0] * (k + 1) for k in range(total)]
    for k, loss in enumerate(chief["train/loss"].values()):
        losses = [figures["local/loss"][sorted(figures["local/loss"])[k]] for figures in local]
        assert min(losses) <= loss * (1 + 1e-6) and loss <= max(losses) * (1 + 1e-6), (k + 1, loss, losses)


def test_local_trains_with_a_server_optimizer_and_fedprox(tmp_path):
    result = comind("local", "--workers", "2", "--output-dir", str(tmp_path), "--rounds", "4", "--interval-steps", "25",
                    "--server-optimizer", "fedadam", "--server-learning-rate", "0.01", "--proximal-mu", "0.01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Round 4/4: 2 updates", result.stdout)
    assert "Server optimizer fedadam with learning rate 0.01." in (tmp_path / "logs" / "ps.log").read_text()
    for task in range(2):
        log = (tmp_path / "logs" / f"worker-{task}.log").read_text()
        assert "FedProx: each local step also minimises 0.01/2" in log
    assert 0 <= final_accuracy(tmp_path) <= 1


def cifar_shaped(path: Path) -> Path:
    """A data set shaped as CIFAR-10 (32x32x3 bytes, 10 classes), small: the advanced model's own shape."""
    rng = np.random.default_rng(0)
    arrays = {f"x_{part}": rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
              for part, count in (("train", 320), ("test", 64))}
    arrays.update(y_train=rng.integers(0, 10, 320), y_test=rng.integers(0, 10, 64))
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("mode, args", [
    ("one machine", ["train", "--steps", "10"]),
    ("federated", ["local", "--workers", "2", "--rounds", "2", "--interval-steps", "5"]),
    ("distributed", ["local", "--workers", "2", "--rounds", "6", "--mode", "distributed"]),
])
def test_the_advanced_model_trains_and_tests_on_cifar_shaped_data(tmp_path, mode, args):
    """Keras 3's RandomCrop does not crop at inference: the model crops 32x32 to 24x24 in training and must test
    on the same 24x24 centre."""
    dataset = cifar_shaped(tmp_path / "cifar-shaped.npz")
    output = tmp_path / "output"
    result = comind(*args, "--model", "advanced", "--dataset", str(dataset), "--output-dir", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 0 <= final_accuracy(output) <= 1
    # With the model's own layers known, and nothing that trains only against a ps.
    loaded = subprocess.run([sys.executable, "-c", "import sys, keras, comind.models; keras.saving.load_model("
                             "sys.argv[1])", str(output / "model.keras")], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr


def digest(arrays) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


@pytest.mark.parametrize("interval", [1, 6, 20])
def test_callback_syncs_every_interval_and_workers_hold_the_ps_model(start_ps, tmp_path, interval):
    examples, epochs, batch = 100, 3, 32
    steps = epochs * math.ceil(examples / batch)  # 12 local steps per worker
    syncs = math.ceil(steps / interval)
    checkpoints = tmp_path / "checkpoints"
    ps = start_ps("--num-workers", "2", "--rounds", str(syncs), "--checkpoint-dir", str(checkpoints),
                  "--keep-checkpoints", "100", "--exit-grace", "10")
    outs = [tmp_path / f"worker-{task}.json" for task in range(2)]
    workers = [subprocess.Popen([sys.executable, ROOT / "tests" / "keras_worker.py", ps.address, str(task),
                                 "--examples", str(examples), "--epochs", str(epochs), "--interval", str(interval),
                                 "--out", str(outs[task])], env=ENV, stderr=subprocess.PIPE, text=True)
               for task in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()
    assert ps.wait() == 0

    for out in outs:
        report = json.loads(out.read_text())
        assert report["syncs"] == syncs
        assert sorted(map(int, report["held"])) == list(range(syncs + 1))  # the initial model, then each round
        for round, held in report["held"].items():
            with np.load(checkpoints / f"round-{int(round):09d}.npz") as saved:
                ps_weights = [saved[f"tensor_{i:05d}"] for i in range(len(saved["names"]))]
            assert held == digest(ps_weights), f"round {round}"


def test_custom_training_loop_trains_federated(start_ps):
    ps = start_ps("--num-workers", "2", "--rounds", "15", "--exit-grace", "10")
    workers = [subprocess.Popen([sys.executable, ROOT / "examples" / "custom_loop.py", "--ps-address", ps.address,
                                 "--task-index", str(task)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for task in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    assert ps.wait() == 0
    accuracy = float(re.search(r"Round 15: test accuracy ([\d.]+)", outputs[0][0]).group(1))
    assert accuracy >= 0.85
    rounds = re.findall(r"Round \d+/15: 2 updates, \d+ examples, loss [\d.]+, accuracy ([\d.]+)\.", ps.log())
    assert len(rounds) == 15
    assert float(rounds[-1]) >= 0.8  # the loop reports its accuracy: the ps's lines read 0.0000 without it


def test_one_machine_training(tmp_path):
    result = comind("train", "--steps", "400", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert final_accuracy(tmp_path) >= 0.90
    assert (tmp_path / "history.png").exists()
    records, epochs = chief_tensorboard(tmp_path, TENSORBOARD_TAGS)  # an epoch a step; no ps, no server optimizer
    assert sorted(epochs["test/accuracy"]) == [r["round"] for r in records] == list(range(1, len(records) + 1))


def test_train_trains_exactly_the_steps_it_is_given(tmp_path):
    """--steps 10 trained a whole epoch of the digits (45 steps)."""
    import keras

    result = comind("train", "--steps", "10", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert int(keras.saving.load_model(tmp_path / "model.keras").optimizer.iterations) == 10
    assert "One process trained 320 examples" in result.stderr


def test_a_worker_added_by_scaling_up_still_gets_a_shard():
    from comind.worker import shard_count

    assert shard_count(1, num_workers=2) == 2
    assert shard_count(5, num_workers=2) == 6


def local_past_round_one(output: Path) -> subprocess.Popen:
    """`comind local` with 2 workers and rounds for ever, once its first round is closed."""
    local = subprocess.Popen([sys.executable, "-m", "comind", "local", "--workers", "2", "--rounds", "100000",
                              "--interval-steps", "1", "--output-dir", str(output)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert local.stdout is not None
    for line in local.stdout:
        if line.startswith("Round 1/"):
            break
    return local


def test_local_stops_and_says_why_when_its_ps_is_stopped(tmp_path):
    local = local_past_round_one(tmp_path)
    [ps] = [pid for pid in children(local.pid) if b"\0ps" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(ps, signal.SIGTERM)
    assert local.wait(timeout=60) == 1
    assert "The ps exited (status 0) and 2 workers were still running" in local.stderr.read()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc (one may end while it is read: it is left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_ctrl_c_on_local_stops_everything_without_a_traceback(tmp_path):
    local = local_past_round_one(tmp_path)
    processes = children(local.pid)
    local.send_signal(signal.SIGINT)
    assert local.wait(timeout=60) == 130
    stderr = local.stderr.read()
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not [pid for pid in processes if Path(f"/proc/{pid}").exists()], "a ps or worker outlived comind local"


def test_the_comind_script_imports_a_model_module_from_the_current_directory(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import keras\n\n\ndef build(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(num_classes, activation='softmax')])\n")
    script = Path(sys.executable).parent / "comind"
    result = subprocess.run([script, "train", "--model", "mymodel:build", "--steps", "5", "--output-dir",
                             str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert 0 <= final_accuracy(tmp_path / "out") <= 1


def test_an_uncompiled_model_that_ends_in_logits_is_compiled_for_logits(tmp_path):
    """A user's model ending in a plain Dense(num_classes) outputs logits: compiled as if they were probabilities,
    it ended at 0.30 where it reaches 0.90."""
    (tmp_path / "logits_model.py").write_text(
        "import keras\n\n\ndef build(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(64, activation='relu'), keras.layers.Dense(num_classes)])\n")
    result = comind("train", "--model", "logits_model:build", "--steps", "150", "--output-dir", str(tmp_path / "out"),
                    env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr
    assert "taken for logits (from_logits=True)" in result.stderr
    assert final_accuracy(tmp_path / "out") >= 0.85
