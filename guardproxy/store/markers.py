"""Exactly-once markers that cost memory in proportion to what is in flight, not to history.

A process's calls get ids ``<epoch>.<seq>``: ``epoch`` is unique to the process (``epoch_from``),
``seq`` grows by one per call. Per tenant and epoch the store keeps one small sorted set
(``Keys.done``): the epoch's high-water mark (every seq up to it is settled, released or can never be
reserved again) and the seqs settled above it. The settle script raises the mark to ``floor - 1``,
where ``floor`` is what ``Seqs.floor`` says: the lowest seq of this process that can still settle.

A seq can still settle while it is:

- being admitted (the script may run after the reply was given up on), or reserved and not settled
  yet (a running call, a running stream);
- waiting in the journal, or in memory when the journal cannot be written (a lost-reply release, a
  settlement the store refused), until the store took it;
- behind Sentinel, settled less than ``store.replay_window_s`` ago (a failover replays it: the new
  primary may lack it while another settle already raised the mark there).

So a seq leaves ``Seqs`` only when the store answered its settlement (applied or not), or its admission
answered without reserving it. The floor never goes down: a seq is handed out above every earlier one.
Ids settled by other processes or later (background responses, batches, ``rebuild:``, ``ext:``) are not
of this kind and keep the per-day ``settled:<day>`` markers.
"""

from __future__ import annotations

import collections
import heapq
import re
import secrets

_EPOCH_ID = re.compile(r"([0-9]+)\.([0-9]+)")
#: The epoch of ids that are not ``<epoch>.<seq>`` (none is ever handed out: INCR starts at 1). Their
#: scripts still name a ``done`` key (Redis Cluster wants every key declared), which they never touch.
NO_EPOCH = 0
#: How often at most the floor is sampled for the replay window.
SAMPLE_EVERY_S = 0.1


def epoch_from(counter: int) -> int:
    """The epoch of a process given ``counter`` by the store (``Store.new_epoch``), with 6 random digits
    below it: a store restored from a backup (its counter set back) must not give a running process's
    epoch to a new one."""
    return counter * 1_000_000 + secrets.randbelow(1_000_000)


def parse(reservation_id: str) -> tuple[int, int] | None:
    """``(epoch, seq)`` of an id ``<epoch>.<seq>``, else ``None``."""
    matched = _EPOCH_ID.fullmatch(reservation_id)
    return None if matched is None else (int(matched.group(1)), int(matched.group(2)))


def epoch_of(reservation_id: str) -> int:
    """The epoch of an id ``<epoch>.<seq>``; ``NO_EPOCH`` for any other id."""
    parsed = parse(reservation_id)
    return NO_EPOCH if parsed is None else parsed[0]


class Seqs:
    """The seqs of one process's epoch: handed out in order, held until they can no longer settle."""

    def __init__(self, epoch: int, started: float, window_s: float = 0.0) -> None:
        self.epoch = epoch
        self._next = 1
        self._held: set[int] = set()
        self._heap: list[int] = []  # the held seqs, smallest first (those released are skipped lazily)
        self.window_s = window_s
        #: (monotonic s, floor then): the floor never goes down, so the oldest sample at least
        #: ``window_s`` old is a floor under every seq settled in the last ``window_s``.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(started, 1)])

    def take(self) -> str:
        """A new id of this epoch, held until ``release``."""
        seq = self._next
        self._next += 1
        self._held.add(seq)
        heapq.heappush(self._heap, seq)
        return f"{self.epoch}.{seq}"

    def owns(self, reservation_id: str) -> int | None:
        """The seq of ``reservation_id`` when it is of this epoch, else ``None``."""
        parsed = parse(reservation_id)
        return parsed[1] if parsed is not None and parsed[0] == self.epoch else None

    def release(self, reservation_id: str) -> None:
        """``reservation_id`` can no longer settle: the store took its settlement, or its admission
        answered without reserving it."""
        seq = self.owns(reservation_id)
        if seq is not None:
            self._held.discard(seq)
            if len(self._heap) > 2 * len(self._held) + 1024:  # released seqs stuck behind a long call
                self._heap = sorted(self._held)

    def held(self) -> int:
        """How many seqs may still settle (for tests and the bench)."""
        return len(self._held)

    def _lowest(self) -> int:
        while self._heap and self._heap[0] not in self._held:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else self._next

    def floor(self, now: float, settling: str = "") -> int:
        """The lowest seq that can still settle, leaving out ``settling``'s (the settle script marks it
        and raises the mark to one under this floor at once, so the mark may pass it)."""
        lowest = self._lowest()
        if self.window_s > 0:
            # Behind Sentinel: the floor ``window_s`` ago (lower), so that no seq settled since falls
            # under a mark before a failover's replay of it.
            if lowest != self._samples[-1][1] and now - self._samples[-1][0] >= SAMPLE_EVERY_S:
                self._samples.append((now, lowest))
            cutoff = now - self.window_s
            while len(self._samples) >= 2 and self._samples[1][0] <= cutoff:
                self._samples.popleft()
            return self._samples[0][1]  # while the process is younger than the window: 1, no mark raised
        if lowest != self.owns(settling):
            return lowest
        heapq.heappop(self._heap)
        above = self._lowest()
        heapq.heappush(self._heap, lowest)
        return above
