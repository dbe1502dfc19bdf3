"""The ps holds a waiting Round call for its long poll (--long-poll-seconds), and says how long at join."""

from __future__ import annotations

import time

from comind.proto import comind_pb2 as pb
from raw_protocol import RawClient


def test_the_ps_answers_not_yet_after_its_long_poll_and_says_how_long_at_join(start_ps):
    ps = start_ps("--num-workers", "2", "--long-poll-seconds", "1.5")
    with RawClient(ps.address) as client:
        reply = client.stub.Join(pb.JoinRequest(task_index=1), timeout=10)
        assert reply.long_poll_seconds == 1.5
        started = time.monotonic()
        # No model yet: the call waits. Its deadline leaves 30 s for the wait, the default long poll.
        answer = client.model(reply.member_id, timeout=60)
        waited = time.monotonic() - started
    assert not answer.header.ready and answer.header.round == -1
    assert 1.5 <= waited < 10
