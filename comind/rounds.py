"""The ps's round state machine: membership, leases, quorum and deadlines.

Pure bookkeeping with an injected clock: no I/O, no threads, no tensors, so
every rule here can be tested by stepping time by hand. The server asks it
what to do and carries the answer out.

Rules (docs/design.md, decision 4):

* Workers register and hold a lease that heartbeats renew, and that holds
  while one of their Round calls is open; a worker whose lease ends is no
  longer live. A task index has one live member at a time,
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
* With client sampling (``policy.sampling``, decision 15), a round draws the
  workers that train in it once it is open and its population is in (at
  once after the first round; the first waits as above, or its deadline):
  ``ceil(K (1 + x))`` of the live workers, by task index. Only their updates
  count (others are ``NOT_SELECTED``), and the quorum is K updates
  (``replicas_to_aggregate`` if that is smaller), or an update from every
  selected worker still live. A round past its deadline without
  ``min_updates`` draws as many again from the live workers not yet
  selected.
* With Poisson sampling (``sampling.poisson_rate``: worker-level DP with client
  sampling), the draw selects each live worker independently with
  probability q, possibly none. The round closes once every selected worker
  still live has reported (at once for an empty draw: its release is the
  noise alone), or at its deadline with the updates it has, none included;
  it never draws again, and takes no ``replicas_to_aggregate`` and no
  ``min_updates`` above 1: each would make whether one worker's update
  counts depend on whether another's came, a change to the sum of up to 2C
  that the noise does not cover (docs/design.md, decision 15).
* With asynchronous rounds (``policy.asynchronous``, ``async_rounds.py``), a
  round is a model version: an update trained from any version within
  ``max_staleness`` of the newest is taken, a worker may send several to one
  version, and the version closes once ``K`` are buffered (or at its
  deadline with ``min_updates``). There is no warm-up. With client sampling
  too, K is a concurrency limit (decision 16): the draw selects K of the live
  workers to train, uniformly, once the population is in, and each time a
  training worker's turn ends (its update is taken, it leaves, its lease
  ends, or it trains past ``round_timeout`` without one) a replacement is
  drawn from the live workers not training. Only training workers get a
  model and may send an update (others' are ``NOT_SELECTED``), so at most K
  train at once; their turns carry over from version to version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import heapq
import secrets
import time
from collections.abc import Callable, Iterator

from comind.async_rounds import AsyncPolicy
from comind.sampling import SamplingPolicy, Selection, draw_seed


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EARLY = "early"          # for a round that is not open yet
    UNKNOWN_WORKER = "unknown_worker"
    NO_MODEL = "no_model"    # nothing to train from yet
    NOT_SELECTED = "not_selected"  # client sampling did not select the worker for this round


@dataclasses.dataclass
class Member:
    task_index: int
    description: str
    expires_at: float
    # The fingerprint of the client certificate that registered, under mutual TLS.
    peer: bytes | None = None
    # Chosen by the worker process that registered: the same process registering again is this member.
    instance: str = ""
    # Its Round calls open on the ps: while one is, the member is live (Rounds.call_open).
    calls: int = 0


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
    sampling: SamplingPolicy = dataclasses.field(default_factory=SamplingPolicy)
    #: Asynchronous rounds (FedBuff); None: synchronous.
    asynchronous: AsyncPolicy | None = None

    @property
    def member_limit(self) -> int:
        return self.max_members or default_max_members(self.num_workers)

    def concurrency(self, live: int) -> int:
        """The workers that train at once with ``live`` live: K of them under client sampling, else all."""
        return self.sampling.quorum(live) if self.sampling.enabled else live

    @property
    def expected_updates(self) -> int:
        """The updates a round of the expected workers closes with: for checks at start."""
        if self.asynchronous is not None:
            return self.asynchronous.buffer(self.concurrency(self.num_workers))
        if not self.sampling.enabled:
            return self.replicas_to_aggregate or self.num_workers
        k = self.sampling.quorum(self.num_workers)
        return min(k, self.replicas_to_aggregate or k)

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
        self._check_sampling()
        self._check_asynchronous()

    def _check_asynchronous(self) -> None:
        """Refuses what asynchronous rounds cannot do: both settings below are about who is in a round."""
        if self.asynchronous is None:
            return
        if self.replicas_to_aggregate is not None:
            raise ValueError(f"Asynchronous rounds close a version at --buffer-size updates; unset "
                             f"--replicas-to-aggregate (COMIND_REPLICAS_TO_AGGREGATE), the synchronous rounds' "
                             f"quorum. Received: replicas_to_aggregate={self.replicas_to_aggregate}")
        if self.sampling.over_selection:
            raise ValueError(f"With asynchronous rounds, client sampling is the number of workers training at once, "
                             f"and a worker that is slow or gone holds up no version (its turn passes to another "
                             f"after --round-timeout at most): there is nothing to over-select for. Unset "
                             f"--over-selection (COMIND_OVER_SELECTION). Received: "
                             f"over_selection={self.sampling.over_selection}")

    def _check_sampling(self) -> None:
        """Refuses sampling settings that contradict the others: no round could close as they say."""
        k = self.sampling.clients_per_round
        if self.sampling.poisson_rate is not None and (self.replicas_to_aggregate is not None or self.min_updates > 1):
            raise ValueError(
                f"With worker-level differential privacy, client sampling draws a Poisson sample, and a round takes "
                f"the update of every selected worker that sends one by its deadline, none included: "
                f"--replicas-to-aggregate (close at the first updates in) and --min-updates above 1 (wait past the "
                f"deadline for more) would make whether one worker's update counts depend on whether another's "
                f"came, which the noise does not cover. Unset them. Received: "
                f"replicas_to_aggregate={self.replicas_to_aggregate}, min_updates={self.min_updates}")
        if k is not None and k > self.member_limit:
            raise ValueError(f"clients_per_round must not exceed max_members ({self.member_limit}): no round could "
                             f"select that many. Received: clients_per_round={k}")
        for name in ("replicas_to_aggregate", "min_updates"):
            if k is not None and (getattr(self, name) or 0) > k:
                raise ValueError(f"{name} must not exceed clients_per_round ({k}): only the selected workers "
                                 f"update, and a round closes at {k} of them. Received: {name}={getattr(self, name)}")


class Rounds:
    """Who is live, which round is open, and whether it may close."""

    def __init__(self, policy: RoundPolicy, round: int = -1, clock: Callable[[], float] = time.monotonic,
                 seeds: Callable[[], int] = draw_seed):
        self.policy = policy
        self.round = round  # last completed round; -1 until the first model exists
        self.members: dict[str, Member] = {}
        self.contributors: set[str] = set()
        # Their task indices: a worker whose lease ended joins again under a new member id, and must not count
        # twice in a round (with DP, twice is a change of 2C that the noise does not cover).
        self._contributing_tasks: set[int] = set()
        self.closing = False
        self._clock = clock
        self._seeds = seeds
        self._by_task: dict[int, str] = {}  # the member id that holds each task index
        # When to look at each member's lease again, earliest first: a heap of one entry per member (and entries of
        # members gone, dropped as they come up). A lease only grows, so an entry is a bound on its member's end:
        # renewals, thousands a second at scale, leave the heap alone, and a member whose entry comes up renewed
        # goes back in at its lease's new end. Scanning every member instead, at each timer wake-up, cost the ps
        # seconds of CPU with 10,000 members (bench/load.py).
        self._expiries: list[tuple[float, str]] = []
        #: The open round's draws under client sampling: the first, then any after its deadline.
        self.draws: list[Selection] = []
        self.selected: set[int] = set()  # the task indices the draws selected
        self._quorum = 0
        #: Updates buffered for the open version (asynchronous rounds, where a worker may send several).
        self.buffered = 0
        #: Asynchronous rounds with client sampling: when each training worker's turn ends if no update comes, by
        #: task index (the keys are ``selected``); and the turns that ended without one in the open version.
        self._turns: dict[int, float] = {}
        self.abandoned = 0
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

    @property
    def asynchronous(self) -> AsyncPolicy | None:
        return self.policy.asynchronous

    @property
    def sampling(self) -> bool:
        return self.policy.sampling.enabled

    @property
    def poisson(self) -> bool:
        """Whether draws are Poisson samples (worker-level DP with client sampling)."""
        return self.policy.sampling.poisson_rate is not None

    def register(self, task_index: int, description: str = "", peer: bytes | None = None,
                 instance: str = "") -> str:
        member_id = secrets.token_hex(16)
        expires_at = self._clock() + self.policy.lease_seconds
        self.members[member_id] = Member(task_index, description, expires_at, peer, instance)
        heapq.heappush(self._expiries, (expires_at, member_id))
        self._seen_tasks.add(task_index)
        self._by_task[task_index] = member_id
        return member_id

    def holder(self, task_index: int) -> str | None:
        """The member id that holds ``task_index``, if a member does."""
        return self._by_task.get(task_index)

    def seconds_left(self, member_id: str) -> float:
        """Until the member's lease ends, unless renewed (a lease at least while one of its calls is open)."""
        member = self.members[member_id]
        return max(self.policy.lease_seconds if member.calls else 0.0, member.expires_at - self._clock())

    def renew(self, member_id: str) -> bool:
        member = self.members.get(member_id)
        if member is None:
            return False
        member.expires_at = self._clock() + self.policy.lease_seconds
        return True

    @contextlib.contextmanager
    def call_open(self, member_id: str) -> Iterator[None]:
        """While one of the member's Round calls is open: its lease holds, and runs a whole lease from the
        call's end.

        The call is the worker's sign of life, checked by the transport (the ps's keepalive pings end a call over
        a dead link), so the worker renews into it only once a lease, to probe its link, not three times: at
        scale, those renewals were most of what an idle worker cost the ps. (An unknown member's call is refused
        by what it does next.)
        """
        member = self.members.get(member_id)
        if member is None:
            yield
            return
        member.calls += 1
        try:
            yield
        finally:
            member.calls -= 1
            self.renew(member_id)  # unless it left meanwhile

    def leave(self, member_id: str) -> Member | None:
        member = self.members.pop(member_id, None)
        if member is not None and self._by_task.get(member.task_index) == member_id:
            del self._by_task[member.task_index]
            self.abandoned += self._end_turn(member.task_index)
        return member

    def expire(self) -> list[Member]:
        """Drops the members whose lease has ended, and returns them."""
        now = self._clock()
        ended, renewed = [], []
        while self._expiries and self._expiries[0][0] <= now:
            _, member_id = heapq.heappop(self._expiries)
            member = self.members.get(member_id)
            if member is None:
                continue  # it left
            if member.expires_at <= now and member.calls:  # live while its call is: looked at again a lease on
                member.expires_at = now + self.policy.lease_seconds
            if member.expires_at > now:
                renewed.append((member.expires_at, member_id))
            else:
                self.leave(member_id)
                ended.append(member)
        for entry in renewed:
            heapq.heappush(self._expiries, entry)
        return ended

    def check(self, member_id: str, round: int) -> Verdict:
        """Whether an update from this member for this round may be aggregated."""
        if member_id not in self.members:
            return Verdict.UNKNOWN_WORKER
        if not self.has_model:
            return Verdict.NO_MODEL
        if self.asynchronous is not None:
            verdict = self._check_staleness(round)
            return Verdict.NOT_SELECTED if verdict is Verdict.ACCEPT and not self.is_selected(member_id) else verdict
        if round < self.open_round or self.closing or self.done:
            return Verdict.STALE
        if round > self.open_round:
            return Verdict.EARLY
        if not self.is_selected(member_id):
            return Verdict.NOT_SELECTED
        if member_id in self.contributors or self.members[member_id].task_index in self._contributing_tasks:
            return Verdict.DUPLICATE
        return Verdict.ACCEPT

    def _check_staleness(self, round: int) -> Verdict:
        """Asynchronous rounds: whether an update for ``round`` (trained from version ``round - 1``) is fresh
        enough. A version being closed is no reason to refuse: the update goes into the next buffer."""
        assert self.asynchronous is not None
        if self.done:
            return Verdict.STALE
        if round > self.open_round:
            return Verdict.EARLY
        return Verdict.STALE if self.staleness(round) > self.asynchronous.max_staleness else Verdict.ACCEPT

    def staleness(self, round: int) -> int:
        """tau of an update for ``round``: the versions published since the one it trained from."""
        return self.round - (round - 1)

    def record(self, member_id: str) -> None:
        self.buffered += 1
        self.contributors.add(member_id)
        task = self.members[member_id].task_index
        self._contributing_tasks.add(task)
        self._end_turn(task)  # asynchronous rounds with client sampling: another worker's turn

    def _end_turn(self, task: int) -> bool:
        """Asynchronous rounds with client sampling: frees a training worker's place; whether it held one."""
        if self._turns.pop(task, None) is None:
            return False
        self.selected.discard(task)
        return True

    def end_silent_turns(self) -> list[int]:
        """Asynchronous rounds with client sampling: ends the turns of training workers without an update for
        ``round_timeout`` (live, renewing, but not sending), and returns their task indices."""
        now = self._clock()
        silent = [task for task, ends in self._turns.items() if ends <= now]
        for task in silent:
            self._end_turn(task)
        self.abandoned += len(silent)
        return silent

    def is_selected(self, member_id: str) -> bool:
        """Whether the member may train in the open round: always without client sampling."""
        if not self.sampling:
            return True
        member = self.members.get(member_id)
        return member is not None and member.task_index in self.selected

    def _population_in(self) -> bool:
        """Whether the workers a round waits for are in: those expected, for the first round; those live before
        a restart, for the first after it (one lease); anyone, later."""
        return (self._warmed_up or len(self._seen_tasks) >= self.policy.num_workers
                or self._clock() >= self._warm_up_ends)

    def draw(self) -> Selection | None:
        """Under client sampling, selects the workers of the open round if it has none yet and may draw now
        (see the module's docstring); returns the draw, or None. With asynchronous rounds, selects workers for the
        free places of the K that train at once."""
        if (not self.sampling or not self.has_model or self.done or not self.members
                or not (self._population_in() or self._clock() >= self.deadline)):
            return None
        if self.asynchronous is not None:
            return self._fill_turns()
        if self.draws or self.closing:
            return None
        live = len(self.members)
        sampling = self.policy.sampling
        if sampling.poisson_rate is not None:
            selection = Selection.draw_poisson(self.open_round, (m.task_index for m in self.members.values()),
                                               sampling.poisson_rate, self._seeds())
            self._quorum = len(selection.selected)  # every one of them: the round takes them all
            self.deadline = self._clock() + self.policy.round_timeout  # from the draw: the first may come at it
            return self._add_draw(selection)
        self._quorum = min(sampling.quorum(live), self.policy.replicas_to_aggregate or live)
        return self._add_draw(self._draw_from(self.members, sampling.size(live)))

    def _fill_turns(self) -> Selection | None:
        """Asynchronous rounds: draws as many workers as there are free places among the K that train at once,
        uniformly from the live workers not training; None if there are none."""
        free = self.policy.concurrency(len(self.members)) - len(self.selected)
        if free <= 0:  # joins and the timers call this too, and mostly find no place free: before the O(live)
            return None
        idle = {mid: m for mid, m in self.members.items() if m.task_index not in self.selected}
        if not idle:
            return None
        selection = self._add_draw(self._draw_from(idle, free))
        self._turns.update(dict.fromkeys(selection.selected, self._clock() + self.policy.round_timeout))
        return selection

    def draw_again(self) -> Selection | None:
        """Selects as many workers again from those live and not yet selected: for a round past its deadline
        without ``min_updates``. None if there are none, under Poisson sampling (a second chance would select
        a worker with a probability above q), or with asynchronous rounds (whose turns end on their own)."""
        if not self.draws or self.closing or self.poisson or self.asynchronous is not None:
            return None
        candidates = {mid: m for mid, m in self.members.items() if m.task_index not in self.selected}
        return self._add_draw(self._draw_from(candidates, len(self.draws[0].selected))) if candidates else None

    def _draw_from(self, candidates: dict[str, Member], size: int) -> Selection:
        return Selection.draw(self.open_round, (m.task_index for m in candidates.values()), size, self._seeds())

    def _add_draw(self, selection: Selection) -> Selection:
        self.draws.append(selection)
        self.selected |= selection.selected
        return selection

    def population(self) -> tuple[int, int]:
        """The open round's ``(sampled, population)``: how many workers it selected of how many live (those of
        its first draw); without client sampling, every live worker and every contributor, both times. With
        asynchronous rounds and client sampling, the workers training (at most K) of the live ones."""
        if self.asynchronous is not None and self.sampling:
            return len(self.selected), len(self.members)
        if self.draws:
            return len(self.selected), len(self.draws[0].population)
        everyone = len(self.contributors.union(self.members))
        return everyone, everyone

    def _live_selected(self) -> list[str]:
        return [mid for mid in map(self._by_task.get, self.selected) if mid is not None]

    def ready_to_close(self) -> bool:
        if not self.has_model or self.closing or self.done:
            return False
        if self.asynchronous is not None:
            return self.buffered >= self.buffer_size() or (
                self._clock() >= self.deadline and self.buffered >= self.policy.min_updates)
        if self.poisson:  # with none, too: an empty draw, or selected workers all gone, is noise alone
            return bool(self.draws) and (self._clock() >= self.deadline
                                         or self.contributors.issuperset(self._live_selected()))
        if not self.contributors:
            return False
        policy = self.policy
        if self.sampling:
            if len(self.contributors) >= self._quorum or (
                    policy.replicas_to_aggregate is None and self.contributors.issuperset(self._live_selected())):
                return True
        elif policy.replicas_to_aggregate is not None:
            if len(self.contributors) >= policy.replicas_to_aggregate:
                return True
        elif (self._population_in()
              # Sizes first: this runs after every update, and comparing the sets
              # each time would cost O(workers^2) per round.
              and len(self.contributors) >= len(self.members) and self.contributors.issuperset(self.members)):
            return True
        return self._clock() >= self.deadline and len(self.contributors) >= policy.min_updates

    def buffer_size(self) -> int:
        """Asynchronous rounds: K, the updates that make the open version (by default half the workers that
        train at once)."""
        assert self.asynchronous is not None
        return self.asynchronous.buffer(self.policy.concurrency(len(self.members)))

    def silent_members(self) -> list[int]:
        """The task indices of live members without an update in a round that is closing for its deadline
        (not for its quorum: backup workers left out by ``replicas_to_aggregate`` are not silent)."""
        quorum = self._quorum if self.sampling else self.policy.replicas_to_aggregate
        if self.asynchronous is not None:
            return []  # no version waits for anyone in particular
        if (quorum is not None and len(self.contributors) >= quorum) or self._clock() < self.deadline:
            return []
        expected = self._live_selected() if self.sampling else self.members
        return [self.members[mid].task_index for mid in expected if mid not in self.contributors]

    def overdue(self) -> bool:
        """The deadline passed without the minimum number of updates (never under Poisson sampling)."""
        return (self.has_model and not self.done and not self.closing and not self.poisson
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
        self.buffered = 0
        self.contributors.clear()
        self._contributing_tasks.clear()
        self.draws = []
        if self.asynchronous is None:  # asynchronous rounds' turns carry over from version to version
            self.selected = set()
        self.abandoned = 0
        self.closing = False
        self.deadline = self._clock() + self.policy.round_timeout

    def extend_deadline(self) -> None:
        self.deadline = self._clock() + self.policy.round_timeout

    def next_event(self) -> float:
        """The next time at which something may change without a call: a lease or deadline ends."""
        # A bound: the timers wake about once a lease for each member, not at each renewal.
        times = [self._expiries[0][0]] if self._expiries else []
        times.extend(self._turns.values())  # asynchronous rounds' turns: at most the workers training at once
        if not self._warmed_up and self._warm_up_ends > self._clock():  # once past, nothing to wake for
            times.append(self._warm_up_ends)
        if self.has_model and not self.done:
            times.append(self.deadline)
        return min(times, default=float("inf"))
