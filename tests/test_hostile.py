"""Hostile peers while honest workers train: each is refused, logged and counted, at a bounded cost.

(Wrong tokens, made-up member ids, plain text against TLS and certificates
from another CA each have their exact refusal checked in test_security.py;
here they come in bulk, alongside training.)
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import grpc
import numpy as np

from comind.proto import comind_pb2 as pb
from comind.protocol import MIN_TRANSFER_SECONDS, transfer_seconds
from numpy_cluster import assert_finishes, read_history, start_worker
from processes import rss_mb
from raw_protocol import RawClient, update_messages
from scrape import Scrape, free_port

TOKEN = "hostile-test-token"
SHAPES = [(100, 10), (10,)]  # tests/numpy_worker.py's model
ROUNDS = 60


def start_metered(start_ps, rounds: int, *flags: str):
    port = free_port()
    ps = start_ps("--num-workers", "2", "--rounds", str(rounds), "--token", TOKEN, "--exit-grace", "5",
                  "--metrics-port", str(port), *flags)
    return ps, lambda: Scrape(port)


def hello(member_id: str, round: int) -> pb.WorkerMessage:
    """The first message of a Round call that carries an update of tests/numpy_worker.py's model."""
    return update_messages(member_id, [np.zeros(shape, np.float32) for shape in SHAPES], round)[0]


def test_a_barrage_of_unauthenticated_peers_does_not_disturb_training(start_ps, tmp_path):
    ps, metrics = start_metered(start_ps, ROUNDS)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(ps.address, task, outs[task], pause=0.05, token=TOKEN) for task in range(2)]
    ps.wait_for(rf"Round 2/{ROUNDS}")
    before = rss_mb(ps.proc.pid)
    host, port = ps.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]  # connect, then say nothing
    for _ in range(50):  # not HTTP/2 at all
        with socket.create_connection((host, int(port))) as garbage:
            garbage.sendall(os.urandom(4096))
    refused: list[grpc.StatusCode] = []

    def intruder(metadata) -> None:
        with RawClient(ps.address) as client:
            for _ in range(25):
                try:
                    client.call([hello("0" * 32, 1)], metadata=metadata)
                except grpc.RpcError as error:
                    refused.append(error.code())

    started = time.monotonic()
    intruders = [threading.Thread(target=intruder, args=(metadata,))
                 for metadata in [(), (("authorization", "Bearer guess"),)] * 4]
    for thread in intruders:
        thread.start()
    for thread in intruders:
        thread.join()
    barrage_seconds = time.monotonic() - started
    peak = rss_mb(ps.proc.pid)

    counted = metrics()
    for sock in idle:
        sock.close()
    for worker in workers:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0
    assert refused == [grpc.StatusCode.UNAUTHENTICATED] * 200
    assert counted("comind_auth_failures_total") == 200
    assert counted("comind_updates_total", result="rejected") == 0  # refused before they were read
    assert len(re.findall(r"Refused /comind\.v2\.ParameterServer/Round: (no token was sent|the token is wrong)",
                          ps.log())) == 200
    assert len(re.findall(rf"Round \d+/{ROUNDS}: 2 updates", ps.log())) == ROUNDS  # nobody got in or was lost
    for out in outs:
        assert [h["round"] for h in read_history(out)] == list(range(ROUNDS + 1))
    assert peak - before < 50, (before, peak)
    print(f"\n200 idle connections, 50 of garbage and 200 unauthenticated updates in {barrage_seconds:.1f} s: "
          f"all refused and counted; ps RSS {before:.0f} -> {peak:.0f} MB; training finished every round")


def test_a_slow_drip_is_cut_off_at_its_deadline_while_the_others_train(start_ps, tmp_path):
    # Training outlasts the drip's deadline; two updates close a round, so the slow member is not waited for.
    rounds = 100
    ps, metrics = start_metered(start_ps, rounds, "--replicas-to-aggregate", "2")
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(ps.address, task, outs[task], pause=0.4, token=TOKEN) for task in range(2)]
    ps.wait_for(rf"Round 1/{rounds}")
    with RawClient(ps.address, TOKEN) as client:
        slow = client.join(7, "slowloris")
        round = client.heartbeat(slow).round
        model_bytes = sum(int(np.prod(shape)) * 4 for shape in SHAPES)

        def drip():
            yield hello(slow, round + 1)
            for _ in range(model_bytes):
                time.sleep(0.5)
                yield pb.WorkerMessage(data=b"\0")

        started = time.monotonic()
        try:
            client.call(drip(), timeout=300, wait_for_model=False)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        cut_after = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # It falls behind 1 MB/s once its 30 s of grace are over, before its whole size's time is up.
    assert MIN_TRANSFER_SECONDS <= cut_after < transfer_seconds(model_bytes) + 5
    ps.wait_for(r"Refused an update: The model's bytes fell behind")
    assert metrics()("comind_updates_total", result="rejected") == 1
    during = len(re.findall(rf"Round \d+/{rounds}: 2 updates", ps.log()))
    for worker in workers:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0
    assert during >= 10  # the honest workers trained on while the drip held a receive slot
    print(f"\nAn update trickling 2 bytes/s was cut after {cut_after:.1f} s; meanwhile the others trained "
          f"{during} rounds")
