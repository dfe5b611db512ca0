"""Where the store keeps what: the names of every key, per tenant (``Keys``) and for every tenant
(``GlobalKeys``), the same on Redis and on the SQLite store.

Every key of a tenant carries ``{tenant}`` as its Redis Cluster hash tag, so each script's keys share
one slot (or the store's one ``hash_tag`` for every tenant, so that ``budgets.global`` stays atomic on a
cluster). Each name's docstring says what the key holds; the scripts (``lua/``) and their SQLite
transcriptions take them as KEYS, and ``copy.py`` moves them between stores as they are.
"""

from __future__ import annotations


class Keys:
    """Key names of one tenant; ``{tenant}`` is the Redis Cluster hash tag (``tag``: one tag for every
    tenant, ``store.hash_tag``, so that ``budgets.global`` stays atomic on a cluster)."""

    def __init__(self, prefix: str, tenant: str, tag: str = "") -> None:
        self.base = f"{prefix}:{{{tag}}}:{tenant}" if tag else f"{prefix}:{{{tenant}}}"

    def spend_day(self, day: str) -> str:
        return f"{self.base}:spend:day:{day}"

    def spend_month(self, month: str) -> str:
        return f"{self.base}:spend:month:{month}"

    @property
    def reservations(self) -> str:
        return f"{self.base}:resv"

    @property
    def reservation_amounts(self) -> str:
        return f"{self.base}:resv:amount"

    @property
    def reserved(self) -> str:
        return f"{self.base}:reserved"

    def settled(self, day: str) -> str:
        """Ids settled or released for reservations admitted on ``day`` (id -> charge micros)."""
        return f"{self.base}:settled:{day}"

    def done(self, epoch: int) -> str:
        """The exactly-once markers of ids ``<epoch>.<seq>`` (``store.markers``): a zset of the epoch's
        high-water mark (member ``mark``) and the seqs settled above it."""
        return f"{self.base}:done:{epoch}"

    @property
    def budget(self) -> str:
        return f"{self.base}:budget"

    def booked_on(self, reservation_id: str) -> str:
        """The day an external spend's id was first booked on (its settled-marker's day)."""
        return f"{self.base}:booked:{reservation_id}"

    @property
    def rate_requests(self) -> str:
        return f"{self.base}:rl:req"

    @property
    def rate_tokens(self) -> str:
        return f"{self.base}:rl:tok"

    @property
    def rate_token_counts(self) -> str:
        return f"{self.base}:rl:tok:n"

    @property
    def rate_token_sum(self) -> str:
        return f"{self.base}:rl:tok:sum"

    def flags(self, period: str, period_id: str) -> str:
        """Once-per-period facts: blocked, the alert events already fired."""
        return f"{self.base}:flags:{period}:{period_id}"

    @property
    def alerts(self) -> str:
        return f"{self.base}:alerts"

    @property
    def alerts_due(self) -> str:
        return f"{self.base}:alerts:due"

    @property
    def alerts_delivery(self) -> str:
        return f"{self.base}:alerts:delivery"

    @property
    def calls(self) -> str:
        return f"{self.base}:calls"

    # -- levels and windows (``budget/levels.py``, admit.v5) --

    def level_spend(self, scope: str, window: str, period: str) -> str:
        """What ``scope`` (``tenant``, ``key:<fingerprint>``, ``model:<name>``) settled in one window."""
        if scope == "tenant":
            return f"{self.base}:spend:{window}:{period}"
        return f"{self.base}:lvl:{scope}:{window}:{period}"

    def level_held(self, scope: str) -> str:
        """Micros the live reservations of ``scope`` hold (the tenant's own: ``reserved``)."""
        return self.reserved if scope == "tenant" else f"{self.base}:lvl:{scope}:held"

    @property
    def reservation_levels(self) -> str:
        """Reservation id -> its books: the holds it took and the spend counters its settlement charges."""
        return f"{self.base}:resv:levels"

    # -- jobs (work orders) --

    @property
    def reservation_jobs(self) -> str:
        """Reservation id -> the job it was made for."""
        return f"{self.base}:resv:job"

    @property
    def job_held(self) -> str:
        """Job id -> micros its live reservations hold."""
        return f"{self.base}:job:held"

    def job(self, job: str) -> str:
        """One job's counters (calls, tokens, cost, per model, first/last call)."""
        return f"{self.base}:job:{job}"

    @property
    def jobs(self) -> str:
        """The tenant's jobs by their last call (ms)."""
        return f"{self.base}:jobs"

    @property
    def api_keys(self) -> str:
        """Runtime API keys' metadata by key id (``keys.py``)."""
        return f"{self.base}:keys"

    @property
    def api_keys_used(self) -> str:
        """Runtime API keys' last use (ms) by key id."""
        return f"{self.base}:keys:used"

    def response(self, digest: str) -> str:
        """One cached upstream answer (``cache.py`` names it by the request's digest)."""
        return f"{self.base}:rc:{digest}"

    @property
    def responses(self) -> str:
        """The tenant's cached answers by when they were stored (zset digest -> ms), oldest out first."""
        return f"{self.base}:rc-index"

    def deferred(self, object_id: str) -> str:
        """A call settled when it ends, after its answer (a batch, a background response): its
        reservation and how it settled (``batches.py``)."""
        return f"{self.base}:deferred:{object_id}"

    @property
    def deferred_open(self) -> str:
        """Ids of the tenant's deferred calls not settled yet (the poller's work list)."""
        return f"{self.base}:deferred-open"

    def stored_object(self, object_id: str) -> str:
        """An object (file, batch, stored response…) the tenant created through the proxy: the
        name of the upstream that holds it (``objects.py``)."""
        return f"{self.base}:obj:{object_id}"

    # -- the semantic cache (``http/semantic.py``) --

    @property
    def semantic_version(self) -> str:
        """A counter raised by every change to the tenant's semantic entries (replicas compare it)."""
        return f"{self.base}:sc:ver"

    @property
    def semantic_ids(self) -> str:
        """Entry id -> its creation time (ms)."""
        return f"{self.base}:sc:ids"

    @property
    def semantic_index(self) -> str:
        """Entry id -> what a replica's index keeps of it (vector, prefix, marks)."""
        return f"{self.base}:sc:index"

    def semantic_answer(self, entry_id: str) -> str:
        """One entry's answer (a ``cache.Entry``), expiring by itself."""
        return f"{self.base}:sc:answer:{entry_id}"

    @property
    def semantic_stats(self) -> str:
        """hits, saved_micros: what the semantic cache saved the tenant (``guardproxy status``)."""
        return f"{self.base}:sc:stats"

    # -- fleet brakes (``http/brakes.py``, ``store/velocity.py``) --

    def loop_hits(self, key_id: str, job: str, digest: str) -> str:
        """When one key sent one request (by its canonical digest) for one job, within the loop window."""
        return f"{self.base}:loop:{key_id}:{job or '-'}:{digest}"

    def loop_alerted(self, key_id: str, job: str, digest: str) -> str:
        """Set for a loop window once its alert event is queued."""
        return f"{self.loop_hits(key_id, job, digest)}:alerted"

    @property
    def spend_hours(self) -> str:
        """UTC hour number -> micro-USD settled in it (for the velocity alert)."""
        return f"{self.base}:spend:hours"

    @property
    def velocity_fired(self) -> str:
        """The hour number whose velocity alert was last queued."""
        return f"{self.base}:velocity:fired"


class GlobalKeys:
    """Key names of the global level (every tenant): ``{_global}`` as hash tag (no tenant id starts
    with ``_``), or the store's one ``hash_tag``."""

    def __init__(self, prefix: str, tag: str = "") -> None:
        self.base = f"{prefix}:{{{tag or '_global'}}}"

    def level_spend(self, scope: str, window: str, period: str) -> str:
        return f"{self.base}:lvl:{scope}:{window}:{period}"

    def level_held(self, scope: str) -> str:
        return f"{self.base}:lvl:{scope}:held"
