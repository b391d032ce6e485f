"""Tests of pars_fast.queue.ScoredRequestQueue, the C++ request queue for vLLM.

The reference is vLLM 0.32's own PriorityRequestQueue, run on the same real
vllm.v1.request.Request objects: random operation streams must give the same
results, errors and iteration order, also on the aged int priorities that
PARSScheduler sets. Also: the RequestQueue interface and its edge cases, bad
inputs, the constructor, update_request, reference counting and re-entrant
Python code. Aging itself (pars_fast.aging) is tested in tests/test_aging.py.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

request_queue = pytest.importorskip("vllm.v1.core.sched.request_queue")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

import pars_fast  # noqa: E402
from pars_fast import _heap  # noqa: E402
from pars_fast.aging import aged_priority  # noqa: E402
from pars_fast.queue import NotQueuedError, ScoredRequestQueue  # noqa: E402

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


def test_same_order_as_vllm_on_aged_priorities():
    """The priorities PARSScheduler sets: aged ints (~1e6 per score unit) at Unix-time arrivals."""
    origin, rate = 1.7e9, 0.5
    # Hand-worked: priority = (score + 0.5 * seconds after origin) * 1e6.
    spec = {  # name: (score, seconds after origin, priority)
        "a": (1.5, 0.0, 1_500_000),
        "b": (0.0, 2.0, 1_000_000),
        "c": (0.5, 1.0, 1_000_000),  # ties b on priority; arrived first
        "d": (-0.75, 4.0, 1_250_000),
    }
    reqs = {}
    for i, (name, (score, dt, want)) in enumerate(spec.items()):
        priority = aged_priority(score, origin + dt, origin, rate)
        assert priority == want, name
        reqs[name] = make_request(i, priority, arrival_time=origin + dt)
    ours, theirs = ScoredRequestQueue(), PriorityRequestQueue()
    for r in reqs.values():
        ours.add_request(r)
        theirs.add_request(r)
    want = [reqs[n] for n in "cbda"]
    assert list(ours) == list(theirs) == want
    # And a long random stream (distinct arrival times: see the FIFO test below).
    rng = random.Random(0)
    stream = [
        make_request(100 + i, aged_priority(rng.uniform(-3, 3), t, origin, rate), arrival_time=t)
        for i, t in enumerate(origin + rng.uniform(0, 600) for _ in range(2000))
    ]
    for r in stream:
        ours.add_request(r)
        theirs.add_request(r)
    n = len(theirs)
    assert [ours.pop_request() for _ in range(n)] == [theirs.pop_request() for _ in range(n)]
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


def test_constructor_takes_no_arguments():
    """The queue has no aging or key function of its own: it orders by request.priority."""
    for kwargs in ({"aging_rate": 0.5}, {"key": len}):
        with pytest.raises(TypeError):
            ScoredRequestQueue(**kwargs)
    with pytest.raises(TypeError, match="takes no arguments"):
        _heap.RequestHeap(0.5)
    with pytest.raises(TypeError, match="takes no arguments"):
        _heap.RequestHeap(key=None)
    q = ScoredRequestQueue()
    assert not hasattr(q, "aging_rate") and not hasattr(q, "key")
    q.add_request(Duck("a"))
    q.__init__()  # re-running __init__ leaves the queue as it was
    assert len(q) == 1
    assert repr(q) == "<ScoredRequestQueue with 1 requests>"


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


def test_cycles_through_the_queue_are_collected():
    q = ScoredRequestQueue()
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
