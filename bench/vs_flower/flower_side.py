"""One Flower run in its deployment mode: a SuperLink, W SuperNodes and ``flwr run``, on loopback.

Settings, each the fastest that keeps the comparison fair:

* ``--insecure`` everywhere: no TLS, as coMind runs here (plain text, no token).
* ``--isolation subprocess`` (the default): each SuperNode's own SuperExec
  starts a ClientApp process per message, and the SuperLink's starts the
  ServerApp. ``process`` isolation only moves the SuperExec into a process we
  would start ourselves; the ClientApp is still one process per message.
* ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``: a SuperExec asks for new work
  every second by default; a tenth of a second takes most of that wait out
  of every round at little CPU cost (0.01, the minimum, makes three processes
  poll at 100 Hz on 2 cores). The SuperNode's 3 s poll of the SuperLink and the
  ServerApp's 3 s poll for replies are fixed in Flower's code.
* ``--disable-runtime-dependency-installation`` on the SuperLink (the
  SuperNodes have it off by default): the app's dependencies are installed
  already, and an install per run would be set-up, not training.
* Telemetry and the update check off: no network calls in the loop.
* No federated evaluation (``fraction_evaluate=0``): the ServerApp tests the
  global model after each round, as coMind's chief does.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
from pathlib import Path

from vs_flower.measure import PeakMemory, Round, RunResult, free_port, start, stop, wait_for

BENCH = Path(__file__).resolve().parents[1]
VENV = BENCH / ".venv-flower"
APP = BENCH / "vs_flower" / "app"
SETUP = BENCH / "setup-flower"
TASK_POLL_SECONDS = "0.1"


def ensure_installed() -> str:
    """Creates bench/.venv-flower (flwr as bench/setup-flower pins it) on first use; returns Flower's version."""
    if not (VENV / "bin" / "flower-superlink").exists():
        print("Setting up Flower in bench/.venv-flower (once)...", flush=True)
        subprocess.run([str(SETUP)], check=True)
    answer = subprocess.run([str(VENV / "bin" / "flower-superlink"), "--version"], capture_output=True, text=True,
                            check=True)
    return answer.stdout.split()[-1]


def run(dataset: Path, workers: int, rounds: int, steps: int, seed: int, workdir: Path) -> RunResult:
    records = workdir / "rounds.jsonl"
    launched = time.time()
    memory = run_app(APP, workers, {"num-workers": workers, "num-server-rounds": rounds, "local-steps": steps,
                                    "seed": seed, "data-path": str(dataset), "record-path": str(records)},
                     rounds, workdir)
    return _result(records, launched, memory)


def run_app(app: Path, workers: int, overrides: dict[str, object], rounds: int, workdir: Path) -> PeakMemory:
    """Runs the Flower App ``app`` on a SuperLink and ``workers`` SuperNodes, with ``overrides`` of its run config.

    The ServerApp writes a JSON line per round to the run config's ``record-path`` (or one with a ``failed``
    key); this returns once it wrote ``rounds`` lines, after stopping every process, with their peak memory.
    Each SuperNode's node config gives its ``partition-id`` and ``num-partitions``.
    """
    home, records = workdir / "flwr-home", Path(str(overrides["record-path"]))
    home.mkdir(parents=True)
    link_port = free_port()
    # flwr run finds the SuperLink through the Flower configuration file.
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(workdir), "FLWR_HOME": str(home),
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_SECONDS, "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    superlink = start(["flower-superlink", "--insecure", "--isolation", "subprocess",
                       "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port)],
                      workdir / "superlink.log", env)
    processes = [superlink]
    try:
        wait_for(lambda: _listening(link_port), processes, "the SuperLink listened", timeout=60)
        supernodes = [start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                             "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port()),
                             "--node-config", f"partition-id={index} num-partitions={workers}"],
                            workdir / f"supernode-{index}.log", env)
                       for index in range(workers)]
        processes += supernodes
        with PeakMemory({"server": [superlink], "worker": supernodes}) as memory:
            config = " ".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())
            submitted = subprocess.run(["flwr", "run", str(app), "bench", "--run-config", config], env=env,
                                       cwd=workdir, capture_output=True, text=True, timeout=120)
            (workdir / "flwr-run.log").write_text(submitted.stdout + submitted.stderr)
            if submitted.returncode != 0:
                raise RuntimeError(f"flwr run failed: {shlex.join(submitted.args)}\n{submitted.stdout[-2000:]}"
                                   f"{submitted.stderr[-2000:]}")
            wait_for(lambda: _recorded(records) >= rounds, processes, "the last round", timeout=1800)
    finally:
        stop(processes)
    return memory


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _recorded(records: Path) -> int:
    """Rounds the ServerApp recorded so far; fails if it recorded its failure."""
    lines = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    failed = [line["failed"] for line in lines if "failed" in line]
    if failed:
        raise RuntimeError(f"The ServerApp failed:\n{failed[0]}")
    return len(lines)


def _result(records: Path, launched: float, memory: PeakMemory) -> RunResult:
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    rounds = [Round(r["round"], r["closed"] - launched, r["evaluated"] - launched, r["accuracy"],
                    r["train_seconds"]) for r in lines]
    bytes_per_round = sum(r["bytes"] for r in lines) / len(lines)
    return RunResult("Flower", rounds, bytes_per_round, memory.peak("server"), memory.peak("worker"))
