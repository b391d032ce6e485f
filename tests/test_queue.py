"""Tests of pars_fast.queue.ScoredRequestQueue, the C++ request queue for vLLM.

The reference is vLLM 0.32's own PriorityRequestQueue, run on the same real
vllm.v1.request.Request objects: random operation streams must give the same
results, errors and iteration order. Also: the RequestQueue interface and its
edge cases, bad inputs, key functions, update_request, reference counting,
re-entrant Python code, and aging (the starvation bound).
"""

from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

request_queue = pytest.importorskip("vllm.v1.core.sched.request_queue")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

import pars_fast  # noqa: E402
from pars_fast.queue import NotQueuedError, ScoredRequestQueue, aging_wait_bound  # noqa: E402

PriorityRequestQueue = request_queue.PriorityRequestQueue
RequestQueue = request_queue.RequestQueue

SAMPLING = SamplingParams(max_tokens=8)
SETTINGS = settings(
    max_examples=60,
    deadline=None,  # shared 2-core machine: timing is not the property under test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_request(i: int, priority: int = 0, arrival_time: float | None = None) -> Request:
    """A real vLLM engine-core Request (cheap: no tokenizer, no model)."""
    return Request(f"req-{i}", [1, 2, 3], SAMPLING, None, arrival_time=arrival_time, priority=priority)


class Duck:
    """The three attributes the queue reads, and nothing else."""

    def __init__(self, request_id: str, priority: float = 0, arrival_time: float = 0.0) -> None:
        self.request_id = request_id
        self.priority = priority
        self.arrival_time = arrival_time

    def __repr__(self) -> str:
        return f"Duck({self.request_id}, p={self.priority}, t={self.arrival_time})"


def outcome(fn, *args):
    """('ok', result) or ('error', IndexError | ValueError): the errors vLLM's queue raises."""
    try:
        return "ok", fn(*args)
    except IndexError:
        return "error", IndexError
    except ValueError:  # NotQueuedError is one
        return "error", ValueError


# --------------------------------------------------- equivalence with vLLM --


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "pop", "peek", "prepend", "prepend_many", "remove", "remove_many"]),
        st.integers(0, 3),  # priority: few values, so ties on priority are the rule (as in vLLM, all 0)
        st.integers(0, 40),  # arrival slot
        st.integers(0, 10**6),  # picks
    ),
    max_size=60,
)


@settings(SETTINGS, max_examples=150)
@given(ops=OPS)
def test_same_results_as_vllm_priority_queue(ops):
    """One op stream on real Requests, applied to both queues, step by step."""
    ours, theirs = ScoredRequestQueue(), PriorityRequestQueue()
    popped: list[Request] = []  # popped requests get prepended back, as the scheduler does
    made: list[Request] = []
    for n, (op, priority, slot, pick) in enumerate(ops):
        if op == "add":
            # Arrival times are unique (vLLM would break a full tie by request_id, we by FIFO).
            req = make_request(n, priority, arrival_time=1000.0 + slot + n * 1e-4)
            made.append(req)
            ours.add_request(req)
            theirs.add_request(req)
        elif op in ("pop", "peek"):
            method = f"{op}_request"
            got, want = outcome(getattr(ours, method)), outcome(getattr(theirs, method))
            assert got[0] == want[0] and got[1] is want[1], (op, got, want)  # same object / same error
            if op == "pop" and got[0] == "ok":
                popped.append(got[1])
        elif op == "prepend" and popped:
            req = popped.pop(pick % len(popped))
            ours.prepend_request(req)
            theirs.prepend_request(req)
        elif op == "prepend_many" and popped:
            k = pick % (len(popped) + 1)
            batch, popped[:] = popped[:k], popped[k:]
            ours.prepend_requests(batch)
            theirs.prepend_requests(batch)
        elif op == "remove" and made:
            req = made[pick % len(made)]  # maybe queued, maybe popped or removed already
            got, want = outcome(ours.remove_request, req), outcome(theirs.remove_request, req)
            assert got == want, (got, want)
        elif op == "remove_many" and made:
            chosen = [made[(pick + 7 * j) % len(made)] for j in range(pick % 4)]
            ours.remove_requests(chosen)
            theirs.remove_requests(chosen)
        ours._check()
        assert len(ours) == len(theirs) and bool(ours) == bool(theirs)
        assert list(ours) == list(theirs)  # same objects, same order (Request has identity ==)
    # Drain both: the pop order is the same.
    while theirs:
        assert ours.pop_request() is theirs.pop_request()
    assert not ours


def test_ties_on_priority_and_arrival_are_fifo():
    """The one documented difference: vLLM breaks a full tie by request_id, this queue by FIFO."""
    q = ScoredRequestQueue()
    reqs = [make_request(i, priority=1, arrival_time=5.0) for i in (3, 1, 2)]
    for r in reqs:
        q.add_request(r)
    assert list(q) == reqs


def test_is_a_vllm_request_queue_with_every_method():
    q = ScoredRequestQueue()
    assert isinstance(q, RequestQueue)
    assert isinstance(q, pars_fast.ScoredRequestQueue)
    for name in RequestQueue.__abstractmethods__:
        assert callable(getattr(q, name)), name
    assert not q and len(q) == 0 and list(q) == []
    with pytest.raises(IndexError, match="pop from empty heap"):
        q.pop_request()
    with pytest.raises(IndexError, match="peek from empty heap"):
        q.peek_request()


def test_remove_semantics_match_vllm():
    a, b, c = (make_request(i, arrival_time=float(i)) for i in range(3))
    stranger = make_request(99)
    q, v = ScoredRequestQueue(), PriorityRequestQueue()
    for queue in (q, v):
        for r in (a, b, c):
            queue.add_request(r)
        with pytest.raises(ValueError):
            queue.remove_request(stranger)  # vLLM: list.remove raises ValueError
        queue.remove_requests([stranger, b, b, "not a request", 7])  # unknown ones are ignored
        queue.remove_requests(iter([a]))
        assert list(queue) == [c]
    with pytest.raises(KeyError, match="'req-99' is not in the queue"):
        q.remove_request(stranger)
    # Same id, different object: not this request.
    twin = make_request(2, arrival_time=2.0)
    assert twin not in q and c in q
    with pytest.raises(NotQueuedError, match="a different request object with id 'req-2'"):
        q.remove_request(twin)
    q.remove_requests([twin])
    assert list(q) == [c]
    q.remove_requests(q)  # removing everything, while iterating over the queue itself
    assert not q


def test_iter_is_a_snapshot_like_vllm():
    reqs = [make_request(i, priority=i % 2, arrival_time=float(i)) for i in range(6)]
    q, v = ScoredRequestQueue(), PriorityRequestQueue()
    for queue in (q, v):
        queue.prepend_requests(reqs)
    its = [iter(q), iter(v)]
    firsts = [next(it) for it in its]
    assert firsts[0] is firsts[1] is reqs[0]
    for queue in (q, v):
        queue.pop_request()
        queue.add_request(make_request(50, priority=-1, arrival_time=0.5))
    rests = [list(it) for it in its]
    assert rests[0] == rests[1] == [reqs[2], reqs[4], reqs[1], reqs[3], reqs[5]]


# --------------------------------------------------------- queue features --


def test_duplicate_and_bad_requests():
    q = ScoredRequestQueue()
    r = make_request(1)
    q.add_request(r)
    with pytest.raises(KeyError, match="'req-1' is already queued"):
        q.add_request(r)
    with pytest.raises(KeyError, match="already queued"):
        q.add_request(make_request(1))
    bad = [
        (object(), TypeError, "has no attribute 'request_id'"),
        (Duck(7), TypeError, "ids must be str, not int"),
        (Duck("x", priority=None), TypeError, r"request.priority must be a real number, not NoneType"),
        (Duck("x", priority="3"), TypeError, "real number, not str"),
        (Duck("x", arrival_time=None), TypeError, "arrival_time must be a real number"),
        (Duck("x", priority=math.nan), ValueError, "priority is NaN"),
        (Duck("x", arrival_time=math.nan), ValueError, "arrival_time is NaN"),
    ]
    for req, exc, match in bad:
        for method in (q.add_request, q.prepend_request, q.update_request, lambda x: q.prepend_requests([x])):
            with pytest.raises(exc, match=match):
                method(req)
    with pytest.raises(TypeError, match="has no attribute 'request_id'"):
        q.remove_request(object())
    assert object() not in q and Duck(3) not in q and 3 not in q
    with pytest.raises(TypeError):
        q.prepend_requests(5)
    with pytest.raises(TypeError):
        q.remove_requests(5)
    q._check()
    assert list(q) == [r]


def test_prepend_requests_is_all_or_nothing():
    q = ScoredRequestQueue()
    q.add_request(Duck("taken", 5))
    with pytest.raises(KeyError, match="'taken' is already queued"):
        q.prepend_requests([Duck("a", 1), Duck("b", 2), Duck("taken", 0)])
    with pytest.raises(KeyError, match="'a' is already queued"):
        q.prepend_requests([Duck("a", 1), Duck("a", 2)])
    with pytest.raises(ValueError, match="NaN"):
        q.prepend_requests([Duck("a", 1), Duck("b", math.nan)])
    assert [r.request_id for r in q] == ["taken"]
    q.prepend_requests(Duck(c, p) for p, c in enumerate("xyz"))  # any iterable, even a generator
    assert [r.request_id for r in q] == ["x", "y", "z", "taken"]


def test_constructor_arguments():
    with pytest.raises(ValueError, match="aging_rate must be finite and >= 0"):
        ScoredRequestQueue(aging_rate=-1.0)
    with pytest.raises(ValueError, match="aging_rate must be finite"):
        ScoredRequestQueue(aging_rate=math.inf)
    with pytest.raises(ValueError, match="NaN"):
        ScoredRequestQueue(aging_rate=math.nan)
    with pytest.raises(TypeError, match="key must be a callable or None"):
        ScoredRequestQueue(key=3)
    q = ScoredRequestQueue(key=len, aging_rate=2)
    assert q.key is len and q.aging_rate == 2.0
    assert ScoredRequestQueue().key is None
    q = ScoredRequestQueue()
    q.add_request(Duck("a"))
    with pytest.raises(RuntimeError, match="non-empty"):
        q.__init__(aging_rate=1.0)
    assert q.aging_rate == 0.0 and len(q) == 1
    assert "1 requests" in repr(q)


def test_key_function_orders_requests():
    lengths = {"a": 300, "b": 20, "c": 80}
    q = ScoredRequestQueue(key=lambda r: lengths[r.request_id])
    for i, name in enumerate("abc"):
        q.add_request(Duck(name, priority=-i, arrival_time=float(i)))  # priority is ignored
    assert [r.request_id for r in q] == ["b", "c", "a"]
    with pytest.raises(TypeError, match=r"key\(request\) must be a real number"):
        ScoredRequestQueue(key=lambda r: "x").add_request(Duck("d"))
    with pytest.raises(ZeroDivisionError):
        ScoredRequestQueue(key=lambda r: 1 / 0).add_request(Duck("d"))


def test_update_request_contains_and_key_of():
    reqs = [Duck(f"r{i}", priority=i, arrival_time=float(i)) for i in range(5)]
    q = ScoredRequestQueue()
    q.prepend_requests(reqs)
    reqs[4].priority = -1
    q.update_request(reqs[4])
    reqs[0].priority = 10
    q.update_request(reqs[0])
    q._check()
    assert [r.request_id for r in q] == ["r4", "r1", "r2", "r3", "r0"]
    assert q.key_of(reqs[4]) == -1.0
    assert all(r in q for r in reqs)
    q.remove_request(reqs[2])
    assert reqs[2] not in q
    for method in (q.update_request, q.key_of, q.remove_request):
        with pytest.raises(NotQueuedError, match="'r2' is not in the queue"):
            method(reqs[2])
    q.clear()
    assert not q and reqs[0] not in q


# ------------------------------------------------ references and memory --


def test_reference_counts_and_lifetimes():
    q = ScoredRequestQueue()
    r = Duck("".join(["fresh", "-id"]))
    base = sys.getrefcount(r)
    for take_out in (
        q.pop_request,
        lambda: q.remove_request(r),
        lambda: q.remove_requests([r]),
        q.clear,
    ):
        q.add_request(r)
        assert sys.getrefcount(r) == base + 1
        q.peek_request()
        list(q)
        take_out()
        assert sys.getrefcount(r) == base, take_out
    del take_out  # a bound method of q
    with pytest.raises(KeyError):
        q.prepend_requests([Duck("dup"), Duck("dup")])
    q.add_request(r)
    with pytest.raises(KeyError):
        q.add_request(r)
    assert sys.getrefcount(r) == base + 1
    q.remove_request(r)
    assert sys.getrefcount(r) == base

    ducks = [Duck(f"w{i}", arrival_time=float(i)) for i in range(3)]
    refs = [weakref.ref(d) for d in ducks]
    q.prepend_requests(ducks)
    del ducks
    q.pop_request()
    assert refs[0]() is None and refs[1]() is not None
    del q
    assert all(w() is None for w in refs)


def test_cycles_through_the_queue_and_key_function_are_collected():
    q = ScoredRequestQueue(key=lambda req: q.aging_rate)  # key -> closure -> q
    r = Duck("cyc")
    r.queue = q  # request -> queue -> request
    q.add_request(r)
    w = weakref.ref(r)
    del q, r
    gc.collect()
    assert w() is None


# ------------------------------------------------------------ re-entrancy --


class Tricky(Duck):
    """A request whose attribute reads run arbitrary code first."""

    def __init__(self, request_id, priority, arrival_time, on_read):
        super().__init__(request_id, priority, arrival_time)
        self._prio = priority
        self.on_read = on_read

    @property
    def priority(self):
        self.on_read()
        return self._prio

    @priority.setter
    def priority(self, value):
        self._prio = value


def test_attribute_reads_that_mutate_the_queue_are_safe():
    q = ScoredRequestQueue()
    q.prepend_requests([Duck(f"r{i}", i, float(i)) for i in range(4)])
    tricky = Tricky("t", 1.5, 9.0, on_read=lambda: q.pop_request())
    q.add_request(tricky)  # pops r0 while being added
    q._check()
    assert [r.request_id for r in q] == ["r1", "t", "r2", "r3"]
    tricky.on_read = lambda: q.clear()
    tricky.priority = -1
    # update_request reads the key first (which clears the queue), then looks
    # the request up: it is gone, so the update reports it as not queued.
    with pytest.raises(NotQueuedError, match="'t' is not in the queue"):
        q.update_request(tricky)
    assert not q


def test_attribute_read_that_queues_the_same_id_is_a_duplicate():
    q = ScoredRequestQueue()
    tricky = Tricky("t", 1, 0.0, on_read=lambda: None)
    tricky.on_read = lambda: (setattr(tricky, "on_read", lambda: None), q.add_request(Duck("t")))
    with pytest.raises(KeyError, match="'t' is already queued"):
        q.add_request(tricky)
    q._check()
    assert [r.request_id for r in q] == ["t"] and tricky not in q


def test_key_function_that_mutates_the_queue_is_safe():
    victims = [Duck(f"v{i}", arrival_time=float(i)) for i in range(3)]

    def key(req):
        if q and req.request_id == "new":
            q.remove_request(q.peek_request())
        return 0.0

    q = ScoredRequestQueue(key=key)
    q.prepend_requests(victims)
    q.add_request(Duck("new", arrival_time=-1.0))
    q._check()
    assert [r.request_id for r in q] == ["new", "v1", "v2"]


# ------------------------------------------------------------------- aging --


def serve_with_steady_short_stream(aging_rate: float, horizon: int) -> int | None:
    """A long request (score 100) arrives at t=0 behind 5 short ones (score 0);
    one short request arrives and one request is served per time unit.
    Returns the time the long request is served, or None within the horizon."""
    q = ScoredRequestQueue(aging_rate=aging_rate)
    for i in range(5):
        q.add_request(Duck(f"s-early-{i}", 0, 0.0))
    q.add_request(Duck("long", 100, 0.0))
    for t in range(1, horizon + 1):
        q.add_request(Duck(f"s{t}", 0, float(t)))
        if q.pop_request().request_id == "long":
            return t
    return None


def test_aging_serves_a_long_request_within_the_bound():
    aging_rate = 2.0
    bound = aging_wait_bound(0.0, 100.0, aging_rate)  # 50 time units of overtaking
    served_at = serve_with_steady_short_stream(aging_rate, horizon=1000)
    # Overtaken by arrivals up to t = 50 (ties go to the earlier arrival, so the
    # one at exactly t = 50 is behind it), plus the 5 queued before it.
    assert served_at is not None and served_at <= bound + 5
    assert served_at == 55
    # Without aging the same stream starves it.
    assert serve_with_steady_short_stream(0.0, horizon=1000) is None
    assert aging_wait_bound(0.0, 100.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        aging_wait_bound(1.0, 0.0, 1.0)


@SETTINGS
@given(
    reqs=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 1000)), min_size=2, max_size=40),
    aging_rate=st.floats(0.01, 100),
)
def test_aging_bound_holds_for_every_pair(reqs, aging_rate):
    """A request (s_a, t_a) is served before every request arriving after
    t_a + (s_a - s_min) / aging_rate, whatever their scores."""
    q = ScoredRequestQueue(aging_rate=aging_rate)
    ducks = [Duck(f"r{i}", s, t) for i, (s, t) in enumerate(reqs)]
    q.prepend_requests(ducks)
    rank = {d.request_id: n for n, d in enumerate(q)}
    s_min = 0.0
    for a in ducks:
        deadline = a.arrival_time + (a.priority - s_min) / aging_rate
        for b in ducks:
            # 1e-9 relative slack: the bound is exact in real numbers; doubles round.
            if b.arrival_time > deadline + 1e-9 * max(1.0, abs(deadline)) * (1 + aging_rate):
                assert rank[a.request_id] < rank[b.request_id], (a, b)


def test_aging_keys_stay_precise_at_wall_clock_times():
    """Arrival times are Unix times (~1.7e9 s); keys are kept relative to the
    first arrival, so a score difference of 1e-6 still orders requests."""
    q = ScoredRequestQueue(aging_rate=1000.0)
    t0 = 1.7e9
    q.add_request(Duck("first", 0.0, t0))
    q.add_request(Duck("b", 2e-6, t0 + 1.0))
    q.add_request(Duck("a", 1e-6, t0 + 1.0))
    assert [r.request_id for r in q] == ["first", "a", "b"]
    assert q.key_of(q.peek_request()) == 0.0


@pytest.mark.parametrize("bad_arrival", [math.inf, -math.inf, math.nan])
def test_rejected_first_arrival_does_not_move_the_aging_origin(bad_arrival):
    """Regression: the queue fixed its aging origin from the first request it saw,
    before checking it. A rejected ``arrival_time=inf`` made the origin inf, and every
    later key became -inf (and the order of later requests was lost)."""
    q = ScoredRequestQueue(aging_rate=2.0)
    for add in (q.add_request, q.prepend_request, lambda r: q.prepend_requests([r])):
        with pytest.raises(ValueError, match="NaN"):
            add(Duck("bad", 0.0, bad_arrival))
    assert not q
    q.add_request(Duck("a", 0.0, 100.0))  # the first accepted arrival sets the origin
    q.add_request(Duck("b", 1.0, 103.0))
    q.add_request(Duck("c", 0.0, 101.0))
    assert q.key_of(q.peek_request()) == 0.0
    assert [(r.request_id, q.key_of(r)) for r in q] == [("a", 0.0), ("c", 2.0), ("b", 7.0)]
    # Once the origin is set, an infinite arrival is orderable: it just goes last (or first).
    if not math.isnan(bad_arrival):
        q.add_request(Duck("edge", 0.0, bad_arrival))
        assert q.key_of(next(r for r in q if r.request_id == "edge")) == bad_arrival
        assert [r.request_id for r in q][0 if bad_arrival < 0 else -1] == "edge"
    q._check()
