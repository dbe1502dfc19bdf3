"""Soak: hundreds of rounds while the ps and workers are killed and restarted at random.

Every worker adds 1.0 to every weight each round and all weigh the same, so
the global model of round R is exactly R whoever contributed: a lost,
repeated or doubly applied round shows in the value, not only in the logs.
Worker 0 is never killed; it and the ps's last run are the memory probes.
``SOAK_ROUNDS`` and ``SOAK_SEED`` make longer or other runs.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal

import numpy as np

from numpy_cluster import assert_finishes, read_history, start_worker
from processes import rss_mb

ROUNDS = int(os.environ.get("SOAK_ROUNDS", "320"))
SEED = int(os.environ.get("SOAK_SEED", "8"))
WORKERS = 3
CHAOS_UNTIL = ROUNDS * 3 // 4  # the rest runs undisturbed, so the ps's last run is long enough to measure


def test_random_kills_lose_no_round_and_memory_stays_flat(start_ps, tmp_path):
    rng = random.Random(SEED)
    checkpoints = tmp_path / "checkpoints"
    flags = ["--num-workers", str(WORKERS), "--rounds", str(ROUNDS), "--lease-seconds", "1.5",
             "--exit-grace", "10", "--checkpoint-dir", str(checkpoints), "--keep-checkpoints", str(ROUNDS + 1)]
    ps = start_ps(*flags)
    port = ps.port
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(WORKERS)]
    workers = [start_worker(ps.address, task, outs[task], pause=0.01) for task in range(WORKERS)]
    ps_runs = [ps]
    kills = {"ps": 0, "worker": 0}

    ps.wait_for(rf"Round 10/{ROUNDS}")
    probe_first = rss_mb(workers[0].pid)
    at = 10
    while True:
        at += rng.randint(8, 30)
        if at >= CHAOS_UNTIL:
            break
        ps.wait_for(rf"Round {at}/{ROUNDS}", timeout=120)
        victim = rng.choice(["ps", 1, 2])
        if victim == "ps":
            ps.kill()
            ps = start_ps(*flags, port=port)
            ps_runs.append(ps)
            ps.wait_for(r"Resumed from \S+ at round \d+")
        else:
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            workers[victim] = start_worker(ps.address, victim, outs[victim], pause=0.01)
        kills["ps" if victim == "ps" else "worker"] += 1

    settled = int(ps.wait_for(rf"Round (\d+)/{ROUNDS}", timeout=120, start=len(ps.lines)).group(1))
    ps_first = rss_mb(ps.proc.pid)
    ps.wait_for(rf"Round {ROUNDS}/{ROUNDS}", timeout=300)
    ps_last, probe_last = rss_mb(ps.proc.pid), rss_mb(workers[0].pid)
    for worker in workers:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0

    # No round lost or repeated: every round is saved once and holds exactly its number.
    assert sorted(int(p.stem.split("-")[1]) for p in checkpoints.glob("round-*.npz")) == list(range(ROUNDS + 1))
    for round in (ROUNDS // 3, ROUNDS // 2, ROUNDS):
        saved = np.load(checkpoints / f"round-{round:09d}.npz")
        assert float(saved["tensor_00000"].ravel()[0]) == round
    # The round number never goes backwards: each restarted ps resumes at or after the last round
    # any ps logged, and every model a worker received, across its restarts, is newer than the last.
    last_closed = 0
    for run in ps_runs:
        resumed = re.search(r"Resumed from \S+ at round (\d+)", run.log())
        assert resumed is None or int(resumed.group(1)) >= last_closed
        last_closed = max([last_closed, *(int(r) for r in re.findall(rf"Round (\d+)/{ROUNDS}:", run.log()))])
    for out in outs:
        history = read_history(out)
        rounds = [h["round"] for h in history]
        assert all(b >= a for a, b in itertools.pairwise(rounds)) and rounds[-1] == ROUNDS
        assert all(h["uniform"] and h["values"][0] == h["round"] for h in history)
    # Memory stays flat: a leak of even a few KB a round would show over hundreds of rounds.
    assert ps_last < ps_first * 1.1 + 5, (ps_first, ps_last)
    assert probe_last < probe_first * 1.1 + 5, (probe_first, probe_last)
    print(f"\nsoak: {ROUNDS} rounds, {kills['ps']} ps and {kills['worker']} worker kills (seed {SEED}); "
          f"ps RSS {ps_first:.0f} -> {ps_last:.0f} MB (rounds {settled}-{ROUNDS} of its last run), "
          f"worker 0 RSS {probe_first:.0f} -> {probe_last:.0f} MB (rounds 10-{ROUNDS})")
