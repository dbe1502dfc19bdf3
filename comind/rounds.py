"""The ps's round state machine: membership, leases, quorum and deadlines.

Pure bookkeeping with an injected clock: no I/O, no threads, no tensors, so
every rule here can be tested by stepping time by hand. The server asks it
what to do and carries the answer out.

Rules (docs/design.md, decision 4):

* Workers register and hold a lease that heartbeats renew; a worker whose
  lease ends is no longer live. A task index has one live member at a time,
  and there are at most ``member_limit`` members.
* Round ``r + 1`` is open once the global model of round ``r`` exists. It
  closes when its quorum is in: ``replicas_to_aggregate`` updates if that is
  set (later ones are stale, as with the original backup workers), otherwise
  an update from every live worker. Until ``num_workers`` workers have
  registered, the first round also waits for them, so a fast chief does not
  close it alone; after a restart from a checkpoint, only for one lease, the
  time live workers take to register again (a dead one will not).
* It also closes when its deadline passes with at least ``min_updates``
  updates; with fewer, the deadline is extended and the wait is reported.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
import time
from collections.abc import Callable


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EARLY = "early"          # for a round that is not open yet
    UNKNOWN_WORKER = "unknown_worker"
    NO_MODEL = "no_model"    # nothing to train from yet


@dataclasses.dataclass
class Member:
    task_index: int
    description: str
    expires_at: float
    # The fingerprint of the client certificate that registered, under mutual TLS.
    peer: bytes | None = None
    # Chosen by the worker process that registered: the same process registering again is this member.
    instance: str = ""


#: The shortest lease: workers renew theirs three times a lease, and a lease
#: of almost nothing would have them renew without a pause.
MIN_LEASE_SECONDS = 0.1


def default_max_members(num_workers: int) -> int:
    """Room for every expected worker twice over, and for 16 more at least: backups and late joiners."""
    return max(2 * num_workers, num_workers + 16)


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    num_workers: int = 2
    replicas_to_aggregate: int | None = None
    min_updates: int = 1
    lease_seconds: float = 10.0
    round_timeout: float = 600.0
    total_rounds: int = 20
    max_members: int | None = None  # None: default_max_members(num_workers)

    @property
    def member_limit(self) -> int:
        return self.max_members or default_max_members(self.num_workers)

    def __post_init__(self) -> None:
        checks = {
            "num_workers": self.num_workers >= 1,
            "replicas_to_aggregate": self.replicas_to_aggregate is None or self.replicas_to_aggregate >= 1,
            "min_updates": self.min_updates >= 1,
            "lease_seconds": self.lease_seconds > 0,
            "round_timeout": self.round_timeout > 0,
            "total_rounds": self.total_rounds >= 1,
            "max_members": self.max_members is None or self.max_members >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be positive. Received: {name}={getattr(self, name)!r}")
        if self.lease_seconds < MIN_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be at least {MIN_LEASE_SECONDS} s. "
                             f"Received: lease_seconds={self.lease_seconds!r}")
        for name in ("replicas_to_aggregate", "min_updates"):
            if (getattr(self, name) or 0) > self.member_limit:
                raise ValueError(f"{name} must not exceed max_members ({self.member_limit}): no round could "
                                 f"reach it. Received: {name}={getattr(self, name)!r}")


class Rounds:
    """Who is live, which round is open, and whether it may close."""

    def __init__(self, policy: RoundPolicy, round: int = -1, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.round = round  # last completed round; -1 until the first model exists
        self.members: dict[str, Member] = {}
        self.contributors: set[str] = set()
        self.closing = False
        self._clock = clock
        self._seen_tasks: set[int] = set()
        self._warmed_up = False
        self.deadline = clock() + policy.round_timeout
        self._warm_up_ends = clock() + policy.lease_seconds if round >= 0 else float("inf")

    @property
    def open_round(self) -> int:
        return self.round + 1

    @property
    def done(self) -> bool:
        return self.round >= self.policy.total_rounds

    @property
    def has_model(self) -> bool:
        return self.round >= 0

    def register(self, task_index: int, description: str = "", peer: bytes | None = None,
                 instance: str = "") -> str:
        member_id = secrets.token_hex(16)
        self.members[member_id] = Member(task_index, description, self._clock() + self.policy.lease_seconds, peer,
                                         instance)
        self._seen_tasks.add(task_index)
        return member_id

    def holder(self, task_index: int) -> str | None:
        """The member id that holds ``task_index``, if a member does."""
        return next((mid for mid, m in self.members.items() if m.task_index == task_index), None)

    def seconds_left(self, member_id: str) -> float:
        """Until the member's lease ends, unless renewed."""
        return max(0.0, self.members[member_id].expires_at - self._clock())

    def renew(self, member_id: str) -> bool:
        member = self.members.get(member_id)
        if member is None:
            return False
        member.expires_at = self._clock() + self.policy.lease_seconds
        return True

    def leave(self, member_id: str) -> Member | None:
        return self.members.pop(member_id, None)

    def expire(self) -> list[Member]:
        """Drops the members whose lease has ended, and returns them."""
        now = self._clock()
        gone = [mid for mid, m in self.members.items() if m.expires_at <= now]
        return [self.members.pop(mid) for mid in gone]

    def check(self, member_id: str, round: int) -> Verdict:
        """Whether an update from this member for this round may be aggregated."""
        if member_id not in self.members:
            return Verdict.UNKNOWN_WORKER
        if not self.has_model:
            return Verdict.NO_MODEL
        if round < self.open_round or self.closing or self.done:
            return Verdict.STALE
        if round > self.open_round:
            return Verdict.EARLY
        if member_id in self.contributors:
            return Verdict.DUPLICATE
        return Verdict.ACCEPT

    def record(self, member_id: str) -> None:
        self.contributors.add(member_id)

    def ready_to_close(self) -> bool:
        if not self.has_model or self.closing or self.done or not self.contributors:
            return False
        policy = self.policy
        if policy.replicas_to_aggregate is not None:
            if len(self.contributors) >= policy.replicas_to_aggregate:
                return True
        elif ((self._warmed_up or len(self._seen_tasks) >= policy.num_workers or self._clock() >= self._warm_up_ends)
              # Sizes first: this runs after every update, and comparing the sets
              # each time would cost O(workers^2) per round.
              and len(self.contributors) >= len(self.members) and self.contributors.issuperset(self.members)):
            return True
        return self._clock() >= self.deadline and len(self.contributors) >= policy.min_updates

    def silent_members(self) -> list[int]:
        """The task indices of live members without an update in a round that is closing for its deadline
        (not for its quorum: backup workers left out by ``replicas_to_aggregate`` are not silent)."""
        quorum = self.policy.replicas_to_aggregate
        if (quorum is not None and len(self.contributors) >= quorum) or self._clock() < self.deadline:
            return []
        return [m.task_index for mid, m in self.members.items() if mid not in self.contributors]

    def overdue(self) -> bool:
        """The deadline passed without the minimum number of updates."""
        return (self.has_model and not self.done and not self.closing
                and self._clock() >= self.deadline and len(self.contributors) < self.policy.min_updates)

    def begin_close(self) -> None:
        """From here on, updates for the open round are stale."""
        self.closing = True

    def complete(self, round: int) -> None:
        """The global model of ``round`` is durable and published: open the next round."""
        if round < self.round:
            raise ValueError(f"The round number never goes backwards: at {self.round}, got {round}.")
        if self.has_model:
            self._warmed_up = True
        self.round = round
        self.contributors.clear()
        self.closing = False
        self.deadline = self._clock() + self.policy.round_timeout

    def extend_deadline(self) -> None:
        self.deadline = self._clock() + self.policy.round_timeout

    def next_event(self) -> float:
        """The next time at which something may change without a call: a lease or deadline ends."""
        times = [m.expires_at for m in self.members.values()]
        if not self._warmed_up and self._warm_up_ends > self._clock():  # once past, nothing to wake for
            times.append(self._warm_up_ends)
        if self.has_model and not self.done:
            times.append(self.deadline)
        return min(times, default=float("inf"))
