"""Network partitions: the ps and each worker in a network namespace of its own.

A cut drops every packet of one node silently (tests/netns.py), for longer
than a lease; then the network heals. Training must go on, lose no round and
finish, with every process exiting 0.
"""

from __future__ import annotations

import re
import time

import pytest

import netns
from numpy_cluster import assert_finishes, read_history, start_worker

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

ROUNDS = 60
LEASE_SECONDS = 2.0
CUT_SECONDS = 3 * LEASE_SECONDS


@pytest.fixture
def network():
    network = netns.Network()
    yield network
    network.close()


def start_cluster(network, start_ps, tmp_path):
    ps_address = network.add("ps")
    ps = start_ps("--num-workers", "2", "--rounds", str(ROUNDS), "--lease-seconds", str(LEASE_SECONDS),
                  "--exit-grace", "10", host=ps_address, port=2222, launcher=tuple(network.command("ps")))
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = []
    for task, out in enumerate(outs):
        network.add(f"worker-{task}")
        workers.append(start_worker(ps.address, task, out, pause=0.2,
                                    launcher=tuple(network.command(f"worker-{task}"))))
    return ps, workers, outs


def closed_rounds(log: str) -> list[tuple[int, int]]:
    """(round, updates) of every round the ps closed, in order."""
    return [(int(r), int(n)) for r, n in re.findall(rf"Round (\d+)/{ROUNDS}: (\d+) updates", log)]


def finish(ps, workers) -> list[str]:
    """Waits for every process to exit 0; returns the workers' logs."""
    for worker in workers:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0
    assert [r for r, _ in closed_rounds(ps.log())] == list(range(1, ROUNDS + 1))  # none lost or repeated
    return [worker.stderr.read() for worker in workers]


def test_a_worker_cut_off_past_its_lease_rejoins_and_training_completes(network, start_ps, tmp_path):
    ps, workers, outs = start_cluster(network, start_ps, tmp_path)
    ps.wait_for(rf"Round 3/{ROUNDS}")
    network.cut("worker-1")
    cut_line = len(ps.lines)
    ps.wait_for(r"Worker 1's lease ended", timeout=3 * LEASE_SECONDS, start=cut_line)
    time.sleep(CUT_SECONDS)
    heal_line, healed = len(ps.lines), time.monotonic()
    network.heal("worker-1")
    ps.wait_for(r"Worker 1 joined", timeout=30, start=heal_line)
    rejoined = time.monotonic() - healed
    both_again = ps.wait_for(rf"Round (\d+)/{ROUNDS}: 2 updates", timeout=30, start=heal_line)

    finish(ps, workers)
    during_cut = [n for _, n in closed_rounds("\n".join(ps.lines[cut_line:heal_line]))]
    assert len(during_cut) >= 3 and set(during_cut[1:]) == {1}, during_cut  # the rounds went on without it
    assert int(both_again.group(1)) < ROUNDS  # it rejoined in time to help train
    for out in outs:
        rounds = [h["round"] for h in read_history(out)]
        assert rounds == sorted(set(rounds)) and rounds[-1] == ROUNDS
    print(f"\nworker cut for {CUT_SECONDS:.0f} s past a {LEASE_SECONDS:.0f} s lease: "
          f"{len(during_cut)} rounds closed without it; rejoined {rejoined:.2f} s after the heal")


def test_a_ps_cut_off_from_everyone_loses_no_worker(network, start_ps, tmp_path):
    ps, workers, outs = start_cluster(network, start_ps, tmp_path)
    ps.wait_for(rf"Round 3/{ROUNDS}")
    network.cut("ps")
    cut_line = len(ps.lines)
    time.sleep(CUT_SECONDS)
    stalled_at = closed_rounds("\n".join(ps.lines[:cut_line]))[-1][0]
    heal_line, healed = len(ps.lines), time.monotonic()
    network.heal("ps")
    ps.wait_for(rf"Round {stalled_at + 2}/{ROUNDS}", timeout=60, start=heal_line)
    resumed = time.monotonic() - healed

    logs = finish(ps, workers)
    assert len(re.findall(r"lease ended", "\n".join(ps.lines[cut_line:heal_line]))) == 2
    for log in logs:  # each worker kept retrying rather than giving up
        assert "The ps is unreachable" in log or "joining again" in log, log
    for out in outs:
        rounds = [h["round"] for h in read_history(out)]
        assert rounds == sorted(set(rounds)) and rounds[-1] == ROUNDS
    print(f"\nps cut off for {CUT_SECONDS:.0f} s: training stalled at round {stalled_at} and "
          f"closed round {stalled_at + 2} {resumed:.2f} s after the heal")
