"""An open Round call holds its worker's lease, with no renewals sent into it; over a dead link, the ps's
keepalive pings end the call and the lease ends after it (comind.rounds.Rounds.call_open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from comind.client import renewal_due
from comind.proto import comind_pb2 as pb
from raw_protocol import RawClient, update_messages

LEASE = 1.0
INITIAL = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
DELTA = [np.full((4, 3), 0.25, np.float32), np.full(3, 0.25, np.float32)]
#: A process that joins as task 1 and waits in a Round call (no renewals) until it is frozen.
WAITER = """
import sys
from comind.proto import comind_pb2 as pb
from raw_protocol import RawClient
client = RawClient(sys.argv[1])
member = client.join(1)
print("waiting", flush=True)
client.call([pb.WorkerMessage(hello=pb.Hello(member_id=member, have_round=0))], timeout=120)
"""


def test_a_worker_waiting_in_its_call_sends_no_renewal_and_keeps_its_lease(start_ps):
    ps = start_ps("--num-workers", "2", "--rounds", "2", "--lease-seconds", str(LEASE))
    with RawClient(ps.address) as client:
        reply = client.stub.Join(pb.JoinRequest(task_index=0), timeout=10)
        assert reply.calls_hold_lease
        a, b = reply.member_id, client.join(1)
        assert client.initialize(a, INITIAL).header.round == 0
        stop = threading.Event()

        def keep(member: str) -> None:  # b renews with heartbeats, out of any call
            while not stop.wait(LEASE / 3):
                client.heartbeat(member)

        keeper = threading.Thread(target=keep, args=(b,))
        keeper.start()
        try:
            waiting = []
            caller = threading.Thread(target=lambda: waiting.append(client.call(update_messages(a, DELTA), timeout=60)))
            caller.start()  # a's update, then its call waits for round 1's model: three leases, without a word
            time.sleep(3 * LEASE)
            assert client.send(b, DELTA).receipt.result == pb.UPDATE_RESULT_ACCEPTED
            caller.join(30)
        finally:
            stop.set()
            keeper.join()
    assert waiting and waiting[0].header.round == 1
    assert "lease ended" not in ps.log()
    ps.wait_for(r"Round 1/2: 2 updates")


def test_a_frozen_worker_loses_its_lease_though_its_call_is_open(start_ps):
    """SIGSTOP: the process answers nothing, not even gRPC's pings, yet its connection stays open."""
    ps = start_ps("--num-workers", "2", "--rounds", "2", "--lease-seconds", str(LEASE))
    tests = Path(__file__).parent
    with RawClient(ps.address) as client:
        chief = client.join(0)
        assert client.initialize(chief, INITIAL).header.round == 0
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, ps.address], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])})
        try:
            assert waiter.stdout.readline().strip() == "waiting"
            ps.wait_for(r"Worker 1 joined")
            time.sleep(2 * LEASE)  # its call holds its lease meanwhile
            assert "Worker 1's lease ended" not in ps.log()
            frozen = time.monotonic()
            waiter.send_signal(signal.SIGSTOP)
            ps.wait_for(r"Worker 1's lease ended", timeout=10 * LEASE)
            # Pings a third of a lease apart, a third to answer, then a lease from the call's end.
            assert time.monotonic() - frozen < 5 * LEASE
        finally:
            waiter.kill()
            waiter.wait()


def test_a_waiting_call_is_probed_once_a_lease_but_not_as_the_long_poll_ends():
    # A 10 s lease and a 30 s long poll from t = 0: probes at 10 and 20; not at 30, when the ps's "not yet" comes
    # (a renewal written then meets the end of the call), but at 33.3 if that end is late.
    assert renewal_due(0, 0, lease=10, long_poll=30) == 10
    assert renewal_due(10, 0, lease=10, long_poll=30) == 20
    assert renewal_due(20, 0, lease=10, long_poll=30) == pytest.approx(30 + 10 / 3)
    # A lease as long as the long poll: no probe while the ps keeps to its poll.
    assert renewal_due(0, 0, lease=30, long_poll=30) == 40
    # A long poll longer than the lease: one probe, at the lease.
    assert renewal_due(0, 0, lease=30, long_poll=55) == 30
    assert renewal_due(30, 0, lease=30, long_poll=55) == 65
