import pytest

from comind.rounds import RoundPolicy, Rounds, Verdict


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def started(clock, members=2, **policy):
    rounds = Rounds(RoundPolicy(**{"num_workers": members, **policy}), clock=clock)
    ids = [rounds.register(task) for task in range(members)]
    rounds.complete(0)  # the initial model
    return rounds, ids


def test_round_closes_when_every_live_worker_pushed():
    rounds, (a, b) = started(Clock())
    assert rounds.check(a, 1) is Verdict.ACCEPT
    rounds.record(a)
    assert not rounds.ready_to_close()
    assert rounds.check(a, 1) is Verdict.DUPLICATE
    rounds.record(b)
    assert rounds.ready_to_close()
    rounds.begin_close()
    assert rounds.check(b, 1) is Verdict.STALE
    rounds.complete(1)
    assert rounds.check(a, 1) is Verdict.STALE and rounds.check(a, 3) is Verdict.EARLY
    assert rounds.check("nobody", 2) is Verdict.UNKNOWN_WORKER


def test_a_worker_that_joins_again_within_a_round_does_not_count_twice():
    clock = Clock()
    rounds, (a, b) = started(clock, lease_seconds=5)
    rounds.record(a)
    clock.now = 4
    rounds.renew(b)
    clock.now = 6
    assert [m.task_index for m in rounds.expire()] == [0]  # a's lease ended; it joins again, under a new id
    again = rounds.register(0)
    assert rounds.check(again, 1) is Verdict.DUPLICATE
    rounds.record(b)
    rounds.begin_close()
    rounds.complete(1)
    assert rounds.check(again, 2) is Verdict.ACCEPT


def test_first_round_waits_for_the_expected_workers():
    clock = Clock()
    rounds = Rounds(RoundPolicy(num_workers=2, round_timeout=60), clock=clock)
    a = rounds.register(0)
    rounds.complete(0)
    rounds.record(a)
    assert not rounds.ready_to_close()  # worker 1 has not registered yet
    clock.now = 61
    assert rounds.ready_to_close()  # unless the deadline passes


def test_after_a_restart_the_first_round_waits_one_lease_for_the_others():
    clock = Clock()
    rounds = Rounds(RoundPolicy(num_workers=2, lease_seconds=5, round_timeout=600), round=11, clock=clock)
    a = rounds.register(0)
    rounds.record(a)
    assert not rounds.ready_to_close() and rounds.next_event() == 5
    clock.now = 5  # worker 1 did not come back within a lease: it is gone
    rounds.renew(a)
    assert rounds.ready_to_close()


def test_a_ps_resumed_after_the_last_round_has_no_timer_due_in_the_past():
    clock = Clock()
    rounds = Rounds(RoundPolicy(num_workers=2, lease_seconds=5, total_rounds=12), round=12, clock=clock)
    clock.now = 6  # past the warm-up, which no round will ever end
    assert rounds.done and rounds.next_event() == float("inf")  # else the timer loop would spin


def test_replicas_to_aggregate_leaves_backup_workers():
    rounds, (a, _b, c) = started(Clock(), members=3, replicas_to_aggregate=2)
    rounds.record(a)
    rounds.record(c)
    assert rounds.ready_to_close()


def test_expired_lease_shrinks_the_quorum():
    clock = Clock()
    rounds, (a, b) = started(clock, lease_seconds=5)
    rounds.record(a)
    clock.now = 4
    rounds.renew(a)
    clock.now = 6
    assert [m.task_index for m in rounds.expire()] == [1]
    assert rounds.ready_to_close()
    assert rounds.check(b, 1) is Verdict.UNKNOWN_WORKER


def test_deadline_needs_the_minimum_and_is_extended_otherwise():
    clock = Clock()
    rounds, (a, b, _c) = started(clock, members=3, round_timeout=10, min_updates=2, lease_seconds=100)
    rounds.record(a)
    clock.now = 10
    assert not rounds.ready_to_close() and rounds.overdue()
    rounds.extend_deadline()
    assert rounds.next_event() == 20 and not rounds.overdue()
    rounds.record(b)
    clock.now = 20
    assert rounds.ready_to_close()


def test_training_ends_after_the_configured_rounds():
    rounds, (a, b) = started(Clock(), total_rounds=1)
    rounds.record(a)
    rounds.record(b)
    rounds.complete(1)
    assert rounds.done and rounds.check(a, 2) is Verdict.STALE
    with pytest.raises(ValueError, match="never goes backwards"):
        rounds.complete(0)


def test_no_model_yet():
    rounds = Rounds(RoundPolicy())
    a = rounds.register(0)
    assert rounds.check(a, 0) is Verdict.NO_MODEL and not rounds.ready_to_close()


@pytest.mark.parametrize("field, value", [("num_workers", 0), ("lease_seconds", 0), ("total_rounds", -1)])
def test_policy_refuses_nonsense(field, value):
    with pytest.raises(ValueError, match=f"{field} must be positive. Received: {field}={value}"):
        RoundPolicy(**{field: value})


def test_the_lease_timer_wakes_at_a_bound_then_at_the_leases_as_renewed():
    # Scanning every member at each timer wake-up cost seconds of ps CPU with 10,000 joining (bench/load.py).
    clock = Clock()
    rounds, (a, b) = started(clock, lease_seconds=5)
    clock.now = 3
    rounds.renew(a)
    rounds.renew(b)
    assert rounds.next_event() == 5  # a bound: the renewals did not move it
    clock.now = 5
    assert rounds.expire() == [] and rounds.next_event() == 8
    clock.now = 7
    rounds.renew(a)
    clock.now = 8
    assert [m.task_index for m in rounds.expire()] == [1] and rounds.next_event() == 12
    rounds.leave(a)
    clock.now = 12
    assert rounds.expire() == [] and rounds.next_event() == rounds.deadline


def test_an_open_call_holds_the_lease_which_runs_a_lease_from_the_calls_end():
    clock = Clock()
    rounds, (a, _b) = started(clock, lease_seconds=5)
    with rounds.call_open(a):
        with rounds.call_open(a):  # a second call (a retry) while the first ends
            clock.now = 12
            assert [m.task_index for m in rounds.expire()] == [1]  # b's lease ended; a's call holds its own
            assert rounds.seconds_left(a) == 5 and rounds.next_event() == 17  # looked at again a lease later
        clock.now = 20
        assert rounds.expire() == []
    clock.now = 24.9
    assert rounds.expire() == [] and rounds.seconds_left(a) == pytest.approx(0.1)
    clock.now = 25
    assert [m.task_index for m in rounds.expire()] == [0]


def test_a_call_of_a_member_gone_or_unknown_changes_no_lease():
    clock = Clock()
    rounds, (a, _b) = started(clock, lease_seconds=5)
    with rounds.call_open("no such member"):
        pass
    with rounds.call_open(a):
        rounds.leave(a)
        a2 = rounds.register(0)  # the same worker again, under a new id, while the old call ends
    clock.now = 5
    assert {m.task_index for m in rounds.expire()} == {0, 1} and a2 not in rounds.members
