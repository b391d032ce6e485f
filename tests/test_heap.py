"""Tests of the C++ indexed heap core (csrc/heap.hpp, csrc/heap.cpp) through the
one type built on it, RequestHeap (pars_fast.queue.ScoredRequestQueue).

A plain-Python reference model defines the expected behaviour: random
operation sequences (Hypothesis) must agree with it in order, stored keys and
errors, including re-keying (update_request) that vLLM's own queue lacks and
big all-or-nothing batches (the heapify path). Also: the ordered snapshot
iterator, reference cycles through it, memory over many operations, __del__
code that re-enters the heap, a 1e6-operation stress test, and the module
surface. tests/test_queue.py holds the tests against vLLM's PriorityRequestQueue.
"""

from __future__ import annotations

import ast
import copy
import gc
import heapq
import math
import operator
import pickle
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pars_fast
from pars_fast import _heap
from pars_fast.queue import NotQueuedError, ScoredRequestQueue


class Duck:
    """A weak-referenceable request with the three attributes the queue reads."""

    def __init__(self, request_id: str, priority: object = 0.0, arrival_time: object = 0.0) -> None:
        self.request_id = request_id
        self.priority = priority
        self.arrival_time = arrival_time

    def __repr__(self) -> str:
        return f"Duck({self.request_id}, p={self.priority}, t={self.arrival_time})"


class RefQueue:
    """The reference model: a dict and a sort. Raises what RequestHeap must raise
    (key = priority, tie = arrival_time, then FIFO; the queue adds nothing to them)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, float, int, Duck]] = {}
        self.seq = 0

    @staticmethod
    def _real(x) -> float:
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(x)
        value = float(x)
        if math.isnan(value):
            raise ValueError("NaN")
        return value

    def _key(self, req: Duck) -> tuple[float, float]:
        return self._real(req.priority), self._real(req.arrival_time)  # the queue reads both first

    def _order(self) -> list[tuple[float, float, int, Duck]]:
        return sorted(self.entries.values(), key=lambda e: e[:3])

    def add_request(self, req: Duck) -> None:
        key, tie = self._key(req)
        if req.request_id in self.entries:
            raise KeyError(req.request_id)
        self.entries[req.request_id] = (key, tie, self.seq, req)
        self.seq += 1

    def prepend_requests(self, reqs: list[Duck]) -> None:
        keys = [self._key(r) for r in reqs]
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids) or any(i in self.entries for i in ids):
            raise KeyError("duplicate")
        for r, (key, tie) in zip(reqs, keys):
            self.entries[r.request_id] = (key, tie, self.seq, r)
            self.seq += 1

    def pop_request(self) -> Duck:
        if not self.entries:
            raise IndexError("pop from empty heap")
        req = self._order()[0][3]
        del self.entries[req.request_id]
        return req

    def peek_request(self) -> Duck:
        if not self.entries:
            raise IndexError("peek from empty heap")
        return self._order()[0][3]

    def _queued(self, req: Duck) -> bool:
        entry = self.entries.get(req.request_id)
        return entry is not None and entry[3] is req

    def remove_request(self, req: Duck) -> None:
        if not self._queued(req):
            raise KeyError(req.request_id)
        del self.entries[req.request_id]

    def remove_requests(self, reqs: list[Duck]) -> None:
        for r in reqs:
            if self._queued(r):
                del self.entries[r.request_id]

    def update_request(self, req: Duck) -> None:
        key, tie = self._key(req)
        if not self._queued(req):
            raise KeyError(req.request_id)
        self.entries[req.request_id] = (key, tie, self.entries[req.request_id][2], req)  # keeps its seq

    def key_of(self, req: Duck) -> float:
        if not self._queued(req):
            raise KeyError(req.request_id)
        return self.entries[req.request_id][0]

    def items(self) -> list[tuple[Duck, float]]:
        return [(e[3], e[0]) for e in self._order()]


def outcome(fn, *args):
    """('ok', result) or ('error', the exception class to compare)."""
    try:
        return "ok", fn(*args)
    except (IndexError, KeyError, ValueError, TypeError) as exc:
        return "error", next(c for c in (IndexError, KeyError, ValueError, TypeError) if isinstance(exc, c))


IDS = st.sampled_from([f"id{i}" for i in range(12)])  # few ids: duplicates and misses are common
KEYS = st.one_of(
    st.sampled_from([0.0, 1.0]),  # equal (key, tie) pairs are common: FIFO and kept seqs matter
    st.sampled_from([0.0, 1.0, 2.5, -3.0, math.inf, -math.inf]),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
)
TIES = st.sampled_from([0.0, 0.0, 0.0, 1.0, -1.0, 7.5])
BAD_KEYS = st.sampled_from([math.nan, "1.0", None, 1j])


class HeapMachine(RuleBasedStateMachine):
    """Random operation sequences: RequestHeap against RefQueue, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = ScoredRequestQueue()
        self.ref = RefQueue()
        self.made: dict[str, Duck] = {}  # the latest object made for each id (queued or not)

    def _duck(self, id_: str, key, tie) -> Duck:
        duck = Duck(id_, key, tie)
        self.made[id_] = duck
        return duck

    def agree(self, method: str, *args):
        got = outcome(getattr(self.queue, method), *args)
        want = outcome(getattr(self.ref, method), *args)
        if want[0] == "error":
            assert got == want, f"{method}{args}: queue gave {got}, reference {want}"
        else:
            assert got[0] == "ok", f"{method}{args}: queue raised {got[1]}, reference returned {want[1]}"
            assert got[1] is want[1] or got[1] == want[1], f"{method}{args}: {got[1]} != {want[1]}"
        return got

    @rule(id_=IDS, key=KEYS, tie=TIES)
    def add(self, id_, key, tie):
        self.agree("add_request", self._duck(id_, key, tie))

    @rule(id_=IDS, key=BAD_KEYS, bad_tie=st.booleans())
    def add_bad(self, id_, key, bad_tie):
        self.agree("add_request", Duck(id_, 0.0, key) if bad_tie else Duck(id_, key, 0.0))

    @rule(ids=st.lists(IDS, max_size=6), data=st.data())
    def prepend_many(self, ids, data):
        keys = data.draw(st.lists(st.one_of(KEYS, BAD_KEYS), min_size=len(ids), max_size=len(ids)))
        ducks = [Duck(i, k, float(n)) for n, (i, k) in enumerate(zip(ids, keys))]
        if self.agree("prepend_requests", ducks)[0] == "ok":
            self.made.update((d.request_id, d) for d in ducks)

    @rule()
    def pop(self):
        self.agree("pop_request")

    @rule()
    def peek(self):
        self.agree("peek_request")

    @rule(id_=IDS)
    def remove(self, id_):
        if id_ in self.made:
            self.agree("remove_request", self.made[id_])

    @rule(id_=IDS)
    def remove_a_twin(self, id_):
        self.agree("remove_request", Duck(id_))  # same id, another object: never queued

    @rule(ids=st.lists(IDS, max_size=4))
    def remove_many(self, ids):
        self.agree("remove_requests", [self.made[i] for i in ids if i in self.made] + [Duck("stranger")])

    @rule(id_=IDS, key=st.one_of(KEYS, BAD_KEYS), tie=TIES)
    def update(self, id_, key, tie):
        duck = self.made.get(id_)
        if duck is None:
            return
        duck.priority, duck.arrival_time = key, tie
        got = self.agree("update_request", duck)
        if got[0] == "error" and self.ref._queued(duck):
            # A rejected new key leaves the stored one; make the object say so again.
            duck.priority, duck.arrival_time = self.ref.entries[id_][:2]

    @rule(id_=IDS)
    def lookups(self, id_):
        duck = self.made.get(id_)
        if duck is not None:
            assert (duck in self.queue) == self.ref._queued(duck)
            self.agree("key_of", duck)
        assert Duck(id_) not in self.queue

    @precondition(lambda self: len(self.ref.entries) > 8)
    @rule()
    def clear(self):
        self.queue.clear()
        self.ref.entries.clear()

    @invariant()
    def same_contents_and_order(self):
        self.queue._check()
        assert len(self.queue) == len(self.ref.entries)
        assert bool(self.queue) == bool(self.ref.entries)
        want = self.ref.items()
        got = list(self.queue)
        assert [d.request_id for d in got] == [d.request_id for d, _ in want]
        assert all(g is w for g, (w, _) in zip(got, want))
        assert [self.queue.key_of(d) for d in got] == [k for _, k in want]


TestHeapAgainstReference = HeapMachine.TestCase
TestHeapAgainstReference.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,  # shared 2-core machine: timing is not the property under test
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------- basics --


def test_version_and_module_surface():
    assert _heap.__version__ == pars_fast.__version__
    assert issubclass(ScoredRequestQueue, _heap.RequestHeap)
    assert _heap.NotQueuedError is NotQueuedError
    assert _heap.ARITY >= 2


def test_equal_keys_come_out_fifo_and_ties_break_before_seq():
    q = ScoredRequestQueue()
    for i in range(50):
        q.add_request(Duck(f"a{i}", 1.0, 0.0))
    q.add_request(Duck("early", 1.0, -1.0))
    q.add_request(Duck("small", 0.5, 99.0))
    assert [q.pop_request().request_id for _ in range(len(q))] == ["small", "early", *(f"a{i}" for i in range(50))]


def test_update_keeps_insertion_order_among_equal_keys():
    a, b, c = Duck("a", 1.0), Duck("b", 5.0), Duck("c", 1.0)
    q = ScoredRequestQueue()
    for d in (a, b, c):
        q.add_request(d)
    b.priority = 1.0
    q.update_request(b)  # b keeps seq 1: between a and c
    assert [d.request_id for d in q] == ["a", "b", "c"]
    a.arrival_time = 1.0
    q.update_request(a)
    assert [d.request_id for d in q] == ["b", "c", "a"]


def test_big_batch_equals_one_by_one():
    """prepend_requests of a big batch rebuilds the heap (O(n)) instead of sifting
    each entry up; the order, equal keys included, must be the same."""
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 50, size=5000).tolist()  # many ties: FIFO must survive heapify
    ducks = [Duck(f"k{i}", k, 0.0) for i, k in enumerate(keys)]
    batched, single = ScoredRequestQueue(), ScoredRequestQueue()
    pre = Duck("pre", 10, 0.0)
    batched.add_request(pre)
    single.add_request(pre)
    batched.prepend_requests(ducks)
    for d in ducks:
        single.add_request(d)
    batched._check()
    assert [d.request_id for d in batched] == [d.request_id for d in single]
    assert all(x is y for x, y in zip(batched, single))


def test_iteration_is_a_snapshot_taken_at_first_next():
    q = ScoredRequestQueue()
    q.prepend_requests([Duck("a", 3), Duck("b", 1), Duck("c", 2)])
    lazy = iter(q)
    q.add_request(Duck("d", 0))  # before the first next(): seen, as with vLLM's generator
    started = iter(q)
    assert next(started).request_id == "d"
    q.pop_request()
    q.add_request(Duck("e", -1))  # after the first next(): not seen
    assert [d.request_id for d in started] == ["b", "c", "a"]
    assert operator.length_hint(lazy) == 4
    assert [d.request_id for d in lazy] == ["e", "b", "c", "a"]
    assert operator.length_hint(lazy) == 0
    assert len(q) == 4 and q.peek_request().request_id == "e"
    it = iter(q)
    del q
    gc.collect()
    assert [d.request_id for d in it] == ["e", "b", "c", "a"]  # the iterator keeps the queue alive


def test_str_subclass_ids_are_stored_as_str_without_running_their_hash():
    class EvilStr(str):
        def __hash__(self):
            raise AssertionError("the heap must not call a str subclass's __hash__")

        def __eq__(self, other):
            raise AssertionError("nor its __eq__")

    q = ScoredRequestQueue()
    d = Duck(EvilStr("x"), 1.0)
    q.add_request(d)
    assert d in q
    q.update_request(d)
    q.remove_request(d)
    assert not q


def test_copy_and_pickle_refuse_instead_of_dropping_entries():
    q = ScoredRequestQueue()
    q.add_request(Duck("a"))
    for attempt in (lambda: pickle.dumps(q), lambda: copy.copy(q), lambda: copy.deepcopy(q)):
        with pytest.raises(TypeError):
            attempt()
    assert len(q) == 1


@pytest.mark.parametrize("key, exc", [(10**400, OverflowError), (np.float32("nan"), ValueError), (1j, TypeError)])
def test_unconvertible_keys_leave_the_queue_unchanged(key, exc):
    q = ScoredRequestQueue()
    ok = Duck("ok", 1.0)
    q.add_request(ok)
    for bad in (Duck("p", key, 0.0), Duck("t", 0.0, key)):
        with pytest.raises(exc):
            q.add_request(bad)
        with pytest.raises(exc):
            q.prepend_requests([Duck("fine", 0.0), bad])
    ok.priority = key
    with pytest.raises(exc):
        q.update_request(ok)
    q._check()
    assert list(q) == [ok] and q.key_of(ok) == 1.0


# ------------------------------------------------ references and memory --


def test_objects_are_freed_after_pop_remove_clear_and_destruction():
    q = ScoredRequestQueue()
    ducks = [Duck(f"i{i}", i) for i in range(6)]
    refs = [weakref.ref(d) for d in ducks]
    q.prepend_requests(ducks)
    third, fourth = ducks[2], ducks[3]
    del ducks
    assert all(r() is not None for r in refs)
    q.pop_request()
    q.pop_request()
    q.remove_request(third)
    del third
    assert [r() is None for r in refs] == [True, True, True, False, False, False]
    it = iter(q)
    next(it)
    del it  # an iterator's snapshot is released too
    fourth.priority = 99
    q.update_request(fourth)
    del fourth
    q.clear()
    assert all(r() is None for r in refs)
    q.add_request(Duck("again"))
    r = weakref.ref(q.peek_request())
    del q
    assert r() is None


def test_reference_cycles_through_the_iterator_are_collected():
    gc.collect()
    q = ScoredRequestQueue()
    d = Duck("cycle")
    q.add_request(d)
    it = iter(q)  # iterator -> queue -> duck -> iterator
    d.it = it
    r_duck = weakref.ref(d)
    del q, d, it
    assert r_duck() is not None  # only the cycle keeps it alive
    gc.collect()
    assert r_duck() is None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_over_many_operations():
    keys = np.random.default_rng(0).random(20_000).tolist()
    ducks = [Duck(f"m{i}", k, float(i)) for i, k in enumerate(keys)]

    def cycle() -> None:
        q = ScoredRequestQueue()
        q.prepend_requests(ducks)
        for i in range(0, 20_000, 3):
            ducks[i].priority = -keys[i]
            q.update_request(ducks[i])
            ducks[i].priority = keys[i]
        q.remove_requests(ducks[::7])
        list(q)
        with pytest.raises(KeyError):
            q.add_request(ducks[1])
        with pytest.raises(ValueError):
            q.add_request(Duck("nan", math.nan))
        while q:
            q.pop_request()

    for _ in range(2):
        cycle()
    gc.collect()
    rss, blocks = _rss_bytes(), sys.getallocatedblocks()
    for _ in range(15):  # 15 x 20k entries: a leak of one 8-byte word per entry shows as > 2 MB
        cycle()
    gc.collect()
    assert sys.getallocatedblocks() - blocks < 1000
    assert _rss_bytes() - rss < 2 * 2**20


# ------------------------------------------------------------ re-entrancy --


def test_finalizers_that_reenter_the_heap_during_clear_are_safe():
    q = ScoredRequestQueue()
    log = []

    class Reenters(Duck):
        def __del__(self):
            log.append(len(q))
            q.add_request(Duck(f"from-del-{self.request_id}", 0.0))
            q._check()

    q.prepend_requests([Reenters(f"r{i}", i) for i in range(5)])
    q.clear()
    # The heap was already empty when the first finalizer ran.
    assert log == [0, 1, 2, 3, 4]
    assert [d.request_id for d in q] == [f"from-del-r{i}" for i in range(5)]
    q._check()


def test_finalizer_run_by_a_removal_can_reenter():
    q = ScoredRequestQueue()
    deaths = []

    class Reenters(Duck):
        def __del__(self):
            deaths.append(len(q))
            q.add_request(Duck(f"from-del-{len(deaths)}", -1.0))

    q.add_request(Reenters("a", 1.0))
    q.add_request(Duck("b", 2.0))
    q.remove_requests([q.peek_request()])  # the last reference dies here, once the heap is consistent
    q._check()
    assert deaths == [1] and [d.request_id for d in q] == ["from-del-1", "b"]
    q.add_request(Reenters("c", -5.0))
    q.pop_request()
    q._check()
    assert deaths == [1, 2] and [d.request_id for d in q] == ["from-del-1", "from-del-2", "b"]


# ------------------------------------------------------------------ stress --


def test_stress_one_million_operations_against_heapq():
    """1e6 mixed operations; every pop is checked against a heapq reference
    (lazy deletion), and the invariants and final contents at the end."""
    rng = np.random.default_rng(1234)
    n_ops = 1_000_000
    ops = rng.choice(4, size=n_ops, p=[0.5, 0.3, 0.1, 0.1]).tolist()  # add, pop, remove, update: grows to ~1e5
    keys = rng.integers(0, 1000, size=n_ops).astype(np.float64).tolist()  # ties are frequent
    picks = rng.random(n_ops).tolist()
    q = ScoredRequestQueue()
    ref: list[tuple[float, int, str]] = []  # (key, seq, id)
    live: dict[str, tuple[float, int, Duck]] = {}
    live_ids: list[str] = []  # for random picks; swap-remove keeps it O(1)
    where: dict[str, int] = {}
    seq = 0
    add, pop, remove, update = q.add_request, q.pop_request, q.remove_request, q.update_request
    ref_push, ref_pop = heapq.heappush, heapq.heappop

    for step in range(n_ops):
        op = ops[step]
        if op == 0 or not live_ids:
            id_ = f"s{step}"
            key = keys[step]
            duck = Duck(id_, key)
            add(duck)
            live[id_] = (key, seq, duck)
            ref_push(ref, (key, seq, id_))
            where[id_] = len(live_ids)
            live_ids.append(id_)
            seq += 1
            continue
        if op == 1:
            while live.get(ref[0][2], (None, None))[:2] != ref[0][:2]:
                ref_pop(ref)  # stale: removed or updated since
            key, _, id_ = ref_pop(ref)
            got = pop()
            assert (got.request_id, got.priority) == (id_, key)
        elif op == 2:
            id_ = live_ids[int(picks[step] * len(live_ids))]
            remove(live[id_][2])
        else:
            id_ = live_ids[int(picks[step] * len(live_ids))]
            _, old_seq, duck = live[id_]
            duck.priority = key = keys[step]
            update(duck)  # an update keeps the entry's seq
            live[id_] = (key, old_seq, duck)
            ref_push(ref, (key, old_seq, id_))
            continue
        # Forget a popped or removed id; swap-remove keeps live_ids O(1).
        i = where.pop(id_)
        last = live_ids.pop()
        if last != id_:
            live_ids[i] = last
            where[last] = i
        del live[id_]
    q._check()
    want = sorted((k, s, i) for i, (k, s, _) in live.items())
    assert [(d.request_id, q.key_of(d)) for d in q] == [(i, k) for k, _, i in want]
    assert len(q) == len(live) > 1000


# ---------------------------------------------------------------- surface --


def test_stub_matches_the_extension():
    """Every name the .pyi stub documents exists, and every public name is documented."""
    stub = ast.parse((Path(_heap.__file__).parent / "_heap.pyi").read_text())
    documented: dict[str, set[str]] = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            documented[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            documented[node.target.id] = set()
    public = {n for n in dir(_heap) if not n.startswith("_")} | {"__version__"}
    assert public == set(documented) - {"_T"}
    for cls_name, methods in documented.items():
        for method in methods:
            assert hasattr(getattr(_heap, cls_name), method), f"{cls_name}.{method}"
    cls = _heap.RequestHeap
    actual = {n for n in vars(cls) if not n.startswith("__")} | {"__init__", "__iter__", "__len__"}
    assert actual <= documented["RequestHeap"] | {"__new__"}, actual - documented["RequestHeap"]
