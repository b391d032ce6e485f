"""Tests of pars_fast._heap.ScoredHeap, the C++ indexed min-heap.

A plain-Python reference model defines the expected behaviour: random
operation sequences (Hypothesis) must agree with it in order, contents and
errors. Also: bad inputs, reference counting and leaks, garbage collection,
re-entrant Python code, a 1e6-operation stress test, and the module surface.
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
from pars_fast.queue import NotQueuedError, ScoredHeap


class Obj:
    """A weak-referenceable payload."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Obj({self.name})"


class RefHeap:
    """The reference model: a dict and a sort. Raises what ScoredHeap must raise."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, float, int, object]] = {}
        self.seq = 0

    @staticmethod
    def _real(x) -> float:
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(x)
        value = float(x)
        if math.isnan(value):
            raise ValueError("NaN")
        return value

    def _order(self) -> list[tuple[str, tuple[float, float, int, object]]]:
        return sorted(self.entries.items(), key=lambda kv: kv[1][:3])

    def push(self, id_, key, obj, tie=0.0) -> None:
        if not isinstance(id_, str):
            raise TypeError(id_)
        key, tie = self._real(key), self._real(tie)
        if id_ in self.entries:
            raise KeyError(id_)
        self.entries[id_] = (key, tie, self.seq, obj)
        self.seq += 1

    def push_many(self, ids, keys, objs, ties=None) -> None:
        ties = [0.0] * len(ids) if ties is None else ties
        if not all(isinstance(i, str) for i in ids):
            raise TypeError("ids")
        keys = [self._real(k) for k in keys]
        ties = [self._real(t) for t in ties]
        if not (len(ids) == len(keys) == len(objs) == len(ties)):
            raise ValueError("lengths")
        if len(set(ids)) != len(ids) or any(i in self.entries for i in ids):
            raise KeyError("duplicate")
        for i, k, o, t in zip(ids, keys, objs, ties):
            self.push(i, k, o, t)

    def popitem(self):
        if not self.entries:
            raise IndexError("pop from empty heap")
        id_, (key, _, _, obj) = self._order()[0]
        del self.entries[id_]
        return id_, key, obj

    def peekitem(self):
        if not self.entries:
            raise IndexError("peek from empty heap")
        id_, (key, _, _, obj) = self._order()[0]
        return id_, key, obj

    def remove(self, id_):
        if not isinstance(id_, str):
            raise TypeError(id_)
        if id_ not in self.entries:
            raise KeyError(id_)
        return self.entries.pop(id_)[3]

    def update(self, id_, key, tie=None) -> None:
        key = self._real(key)
        tie = None if tie is None else self._real(tie)
        if id_ not in self.entries:
            raise KeyError(id_)
        old_key, old_tie, seq, obj = self.entries[id_]
        self.entries[id_] = (key, old_tie if tie is None else tie, seq, obj)

    def items(self) -> list[tuple[str, float, object]]:
        return [(i, e[0], e[3]) for i, e in self._order()]


def outcome(fn, *args, **kwargs):
    """('ok', result) or ('error', the exception class to compare)."""
    try:
        return "ok", fn(*args, **kwargs)
    except (IndexError, KeyError, ValueError, TypeError) as exc:
        return "error", next(c for c in (IndexError, KeyError, ValueError, TypeError) if isinstance(exc, c))


IDS = st.sampled_from([f"id{i}" for i in range(12)])  # few ids: duplicates and misses are common
KEYS = st.one_of(
    st.sampled_from([0.0, 1.0, 1.0, 2.5, -3.0, math.inf, -math.inf]),  # many equal keys: FIFO matters
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
)
BAD_KEYS = st.sampled_from([math.nan, "1.0", None, 1j])


class HeapMachine(RuleBasedStateMachine):
    """Random operation sequences: ScoredHeap against RefHeap, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.heap = ScoredHeap()
        self.ref = RefHeap()
        self.n_objs = 0

    def _obj(self) -> Obj:
        self.n_objs += 1
        return Obj(str(self.n_objs))

    def agree(self, method: str, *args, **kwargs):
        got = outcome(getattr(self.heap, method), *args, **kwargs)
        want = outcome(getattr(self.ref, method), *args, **kwargs)
        if want[0] == "error":
            assert got == want, f"{method}{args}: heap gave {got}, reference {want}"
        else:
            assert got[0] == "ok", f"{method}{args}: heap raised {got[1]}, reference returned {want[1]}"
            assert got[1] == want[1], f"{method}{args}: {got[1]} != {want[1]}"
        return got

    @rule(id_=IDS, key=KEYS, tie=st.none() | KEYS)
    def push(self, id_, key, tie):
        if tie is None:
            self.agree("push", id_, key, self._obj())
        else:
            self.agree("push", id_, key, self._obj(), tie)

    @rule(id_=st.one_of(IDS, st.integers()), key=BAD_KEYS)
    def push_bad(self, id_, key):
        self.agree("push", id_, key, self._obj())

    @rule(ids=st.lists(IDS, max_size=6), data=st.data(), as_array=st.booleans())
    def push_many(self, ids, data, as_array):
        keys = data.draw(st.lists(KEYS, min_size=len(ids), max_size=len(ids)))
        objs = [self._obj() for _ in ids]
        if as_array:
            keys = np.array(keys, dtype=np.float64)
        self.agree("push_many", ids, keys, objs)

    @rule()
    def popitem(self):
        self.agree("popitem")

    @rule()
    def pop(self):
        want = outcome(self.ref.popitem)
        got = outcome(self.heap.pop)
        assert got == (want if want[0] == "error" else ("ok", want[1][2]))

    @rule()
    def peek(self):
        self.agree("peekitem")
        want = outcome(self.ref.peekitem)
        assert outcome(self.heap.peek) == (want if want[0] == "error" else ("ok", want[1][2]))

    @rule(id_=IDS)
    def remove(self, id_):
        self.agree("remove", id_)

    @rule(id_=IDS, key=KEYS, tie=st.none() | KEYS)
    def update(self, id_, key, tie):
        self.agree("update", id_, key, tie)

    @rule(id_=IDS)
    def lookups(self, id_):
        assert self.heap.contains(id_) == (id_ in self.ref.entries) == (id_ in self.heap)
        want = self.ref.entries.get(id_)
        if want is None:
            with pytest.raises(NotQueuedError):
                self.heap.key_of(id_)
        else:
            assert self.heap.key_of(id_) == want[0]

    @precondition(lambda self: len(self.ref.entries) > 8)
    @rule()
    def clear(self):
        self.heap.clear()
        self.ref.entries.clear()

    @invariant()
    def same_contents_and_order(self):
        self.heap._check()
        assert len(self.heap) == len(self.ref.entries)
        assert bool(self.heap) == bool(self.ref.entries)
        want = self.ref.items()
        assert list(self.heap.items()) == want
        assert list(self.heap) == [obj for _, _, obj in want]


TestHeapAgainstReference = HeapMachine.TestCase
TestHeapAgainstReference.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,  # shared 2-core machine: timing is not the property under test
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------- basics --


def test_version_matches_package():
    assert _heap.__version__ == pars_fast.__version__
    assert pars_fast.ScoredHeap is ScoredHeap is _heap.ScoredHeap
    assert _heap.ARITY >= 2


def test_equal_keys_come_out_fifo_and_ties_break_before_seq():
    h = ScoredHeap()
    for i in range(50):
        h.push(f"a{i}", 1.0, i)
    h.push("early", 1.0, "early", tie=-1.0)
    h.push("small", 0.5, "small", tie=99.0)
    assert [h.pop() for _ in range(len(h))] == ["small", "early", *range(50)]


def test_update_keeps_insertion_order_among_equal_keys():
    h = ScoredHeap()
    h.push("a", 1.0, "a")
    h.push("b", 5.0, "b")
    h.push("c", 1.0, "c")
    h.update("b", 1.0)  # b keeps seq 1: between a and c
    assert list(h) == ["a", "b", "c"]
    h.update("a", 1.0, tie=1.0)
    assert list(h) == ["b", "c", "a"]


def test_push_many_accepts_numpy_arrays_of_any_real_dtype():
    for dtype in (np.float64, np.float32, np.int64, np.int32, np.uint8, np.int16):
        h = ScoredHeap()
        keys = np.array([3, 1, 2, 0], dtype=dtype)
        ties = np.array([0, 0, 0, 0], dtype=dtype)
        h.push_many(np.array(["c", "a", "b", "z"]), keys, ["C", "A", "B", "Z"], ties)
        assert list(h.items()) == [("z", 0.0, "Z"), ("a", 1.0, "A"), ("b", 2.0, "B"), ("c", 3.0, "C")]
    # Strided views are read through their strides.
    h = ScoredHeap()
    h.push_many(["x", "y"], np.array([5.0, -1.0, 4.0, -2.0])[::2], [0, 1])
    assert list(h.items()) == [("y", 4.0, 1), ("x", 5.0, 0)]
    # A bool array is not a buffer of reals: it goes item by item (bool is an int).
    h = ScoredHeap()
    h.push_many(["t", "f"], np.array([True, False]), [1, 0])
    assert list(h) == [0, 1]


def test_push_many_big_batch_equals_one_by_one():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 50, size=5000).astype(np.float64)  # many ties: FIFO must survive heapify
    ids = [f"k{i}" for i in range(5000)]
    a, b = ScoredHeap(), ScoredHeap()
    a.push("pre", 10.0, -1)
    b.push("pre", 10.0, -1)
    a.push_many(ids, keys, list(range(5000)))
    for i, k in enumerate(keys):
        b.push(ids[i], float(k), i)
    a._check()
    assert list(a.items()) == list(b.items())


def test_iteration_is_a_snapshot_taken_at_first_next():
    h = ScoredHeap()
    h.push_many(["a", "b", "c"], [3, 1, 2], ["A", "B", "C"])
    lazy = iter(h)
    h.push("d", 0.0, "D")  # before the first next(): seen, as with vLLM's generator
    started = iter(h)
    assert next(started) == "D"
    h.pop()
    h.push("e", -1.0, "E")  # after the first next(): not seen
    assert list(started) == ["B", "C", "A"]
    assert operator.length_hint(lazy) == 4
    assert list(lazy) == ["E", "B", "C", "A"]
    assert operator.length_hint(lazy) == 0
    assert len(h) == 4 and h.peek() == "E"
    it = h.items()
    del h
    gc.collect()
    assert [i for i, _, _ in it] == ["e", "b", "c", "a"]  # the iterator keeps the heap alive


def test_str_subclass_ids_are_stored_as_str_without_running_their_hash():
    class EvilStr(str):
        def __hash__(self):
            raise AssertionError("the heap must not call a str subclass's __hash__")

        def __eq__(self, other):
            raise AssertionError("nor its __eq__")

    h = ScoredHeap()
    h.push(EvilStr("x"), 1.0, "X")
    assert "x" in h and h.contains(EvilStr("x"))
    (id_, _, _) = h.peekitem()
    assert type(id_) is str
    assert h.remove(EvilStr("x")) == "X"


# ------------------------------------------------------------ bad inputs --


def test_empty_heap_raises_index_error():
    h = ScoredHeap()
    for method in (h.pop, h.peek, h.popitem, h.peekitem):
        with pytest.raises(IndexError, match="empty heap"):
            method()


@pytest.mark.parametrize(
    "key, exc, match",
    [
        (math.nan, ValueError, "NaN"),
        (np.float32("nan"), ValueError, "NaN"),
        ("1.0", TypeError, "real number, not str"),
        (None, TypeError, "real number, not NoneType"),
        (1j, TypeError, "real number, not complex"),
        (10**400, OverflowError, None),
    ],
)
def test_bad_keys(key, exc, match):
    h = ScoredHeap()
    with pytest.raises(exc, match=match):
        h.push("a", key, 1)
    h.push("b", 0.0, 1)
    with pytest.raises(exc, match=match):
        h.update("b", key)
    with pytest.raises(exc, match=match):
        h.push("c", 0.0, 1, tie=key)
    assert list(h.items()) == [("b", 0.0, 1)]


def test_bad_ids_and_unknown_ids():
    h = ScoredHeap()
    for bad in (1, None, b"a", ("a",)):
        with pytest.raises(TypeError, match="ids must be str"):
            h.push(bad, 1.0, 1)
        with pytest.raises(TypeError, match="ids must be str"):
            h.remove(bad)
        assert bad not in h
    h.push("a", 1.0, 1)
    with pytest.raises(KeyError, match="duplicate id 'a'"):
        h.push("a", 2.0, 2)
    for method in (h.remove, h.key_of, lambda i: h.update(i, 1.0)):
        with pytest.raises(NotQueuedError, match="'b' is not in the heap"):
            method("b")
    assert issubclass(NotQueuedError, KeyError) and issubclass(NotQueuedError, ValueError)
    assert list(h.items()) == [("a", 1.0, 1)]


def test_copy_and_pickle_refuse_instead_of_dropping_entries():
    h = ScoredHeap()
    h.push("a", 1.0, 1)
    for attempt in (lambda: pickle.dumps(h), lambda: copy.copy(h), lambda: copy.deepcopy(h)):
        with pytest.raises(TypeError, match="cannot pickle"):
            attempt()


def test_bad_arguments():
    h = ScoredHeap()
    with pytest.raises(TypeError, match="missing required argument 'obj'"):
        h.push("a", 1.0)
    with pytest.raises(TypeError, match="at most 4 arguments"):
        h.push("a", 1.0, 1, 2.0, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tye'"):
        h.push("a", 1.0, 1, tye=2.0)
    with pytest.raises(TypeError, match="multiple values for argument 'key'"):
        h.push("a", 1.0, 1, key=2.0)
    h.push(id="k", key=2.0, obj="K", tie=1.0)
    assert h.peekitem() == ("k", 2.0, "K")
    with pytest.raises(TypeError):
        ScoredHeap(1)


def test_push_many_is_all_or_nothing():
    h = ScoredHeap()
    h.push("taken", 0.0, 0)
    cases = [
        ((["a", "b", "taken"], [1, 2, 3], [1, 2, 3]), KeyError, "duplicate id 'taken'"),
        ((["a", "b", "a"], [1, 2, 3], [1, 2, 3]), KeyError, "duplicate id 'a'"),
        ((["a", "b"], [1, 2, 3], [1, 2]), ValueError, "same length"),
        ((["a", "b"], [1, 2], [1]), ValueError, "same length"),
        ((["a", "b"], [1, math.nan], [1, 2]), ValueError, "NaN"),
        ((["a", "b"], np.array([1.0, np.nan]), [1, 2]), ValueError, r"keys\[1\] is NaN"),
        ((["a", "b"], np.ones((2, 2)), [1, 2]), ValueError, "one-dimensional"),
        ((["a", 2], [1, 2], [1, 2]), TypeError, "ids must be str"),
        ((["a", "b"], [1, "x"], [1, 2]), TypeError, "real number"),
        ((["a", "b"], 5, [1, 2]), TypeError, "sequence or a 1-D array"),
        (("ab", [1, 2], 7), TypeError, "objs must be a sequence"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            h.push_many(*args)
        h._check()
        assert list(h.items()) == [("taken", 0.0, 0)], args
    with pytest.raises(ValueError, match="same length"):
        h.push_many(["a"], [1.0], [1], ties=[1.0, 2.0])


# ------------------------------------------------ references and memory --


def test_reference_counts_return_to_baseline():
    h = ScoredHeap()
    obj = Obj("x")
    id_ = "".join(["some", "-id"])  # a fresh str object, not an interned literal
    base_obj, base_id = sys.getrefcount(obj), sys.getrefcount(id_)
    h.push(id_, 1.0, obj)
    assert sys.getrefcount(obj) == base_obj + 1
    assert sys.getrefcount(id_) == base_id + 1
    assert h.pop() is obj
    assert (sys.getrefcount(obj), sys.getrefcount(id_)) == (base_obj, base_id)

    for remove in (lambda: h.remove(id_), lambda: h.popitem(), lambda: h.clear()):
        h.push(id_, 1.0, obj)
        remove()
        assert (sys.getrefcount(obj), sys.getrefcount(id_)) == (base_obj, base_id)

    h.push(id_, 1.0, obj)
    list(h)
    list(h.items())
    h.peekitem()
    assert sys.getrefcount(obj) == base_obj + 1
    del h
    assert (sys.getrefcount(obj), sys.getrefcount(id_)) == (base_obj, base_id)

    # Failed pushes keep no reference.
    h = ScoredHeap()
    h.push(id_, 1.0, obj)
    other = Obj("y")
    base_other = sys.getrefcount(other)
    for args in ((id_, 1.0, other), ("z", math.nan, other)):
        with pytest.raises((KeyError, ValueError)):
            h.push(*args)
    del args  # the loop variable still holds the last tuple
    with pytest.raises(KeyError):
        h.push_many(["n1", id_], [1, 2], [other, other])
    assert sys.getrefcount(other) == base_other


def test_objects_are_freed_after_pop_remove_clear_and_destruction():
    h = ScoredHeap()
    objs = [Obj(str(i)) for i in range(6)]
    refs = [weakref.ref(o) for o in objs]
    h.push_many([f"i{i}" for i in range(6)], list(range(6)), objs)
    del objs
    assert all(r() is not None for r in refs)
    h.pop()
    h.popitem()
    h.remove("i2")
    assert [r() is None for r in refs] == [True, True, True, False, False, False]
    it = iter(h)
    next(it)
    del it  # an iterator's snapshot is released too
    h.update("i3", 99.0)
    h.clear()
    assert all(r() is None for r in refs)
    h.push("again", 0.0, Obj("again"))
    r = weakref.ref(h.peek())
    del h
    assert r() is None


def test_reference_cycles_through_the_heap_are_collected():
    gc.collect()
    h = ScoredHeap()
    obj = Obj("cycle")
    obj.heap = h  # obj -> heap -> obj
    h.push("c", 1.0, obj)
    it = h.items()  # iterator -> heap
    obj.it = it
    r_obj = weakref.ref(obj)
    del h, obj, it
    assert r_obj() is not None  # only the cycle keeps it alive
    gc.collect()
    assert r_obj() is None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_over_many_operations():
    ids = [f"m{i}" for i in range(20_000)]
    keys = np.random.default_rng(0).random(20_000)
    payload = list(range(20_000))

    def cycle() -> None:
        h = ScoredHeap()
        h.push_many(ids, keys, payload)
        for i in range(0, 20_000, 3):
            h.update(ids[i], -keys[i])
        for i in range(0, 20_000, 7):
            h.remove(ids[i])
        list(h.items())
        with pytest.raises(KeyError):
            h.push(ids[1], 0.0, None)
        with pytest.raises(ValueError):
            h.push("nan", math.nan, None)
        while h:
            h.popitem()

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


def test_key_conversion_that_mutates_the_heap_is_safe():
    h = ScoredHeap()
    h.push_many(["a", "b", "c"], [1, 2, 3], ["A", "B", "C"])

    class Sneaky:
        def __float__(self):
            h.pop()
            h.push("x", 0.5, "X")
            return 2.5

    h.push("s", Sneaky(), "S")
    h._check()
    assert list(h.items()) == [("x", 0.5, "X"), ("b", 2.0, "B"), ("s", 2.5, "S"), ("c", 3.0, "C")]
    h.update("c", Sneaky())  # pops x, pushes x again, then updates c
    h._check()
    assert list(h) == ["X", "B", "C", "S"]  # c keeps its older seq: ahead of s at an equal key

    class PushesSameId:
        def __float__(self):
            h.push("late", 9.0, "first")
            return 1.0

    with pytest.raises(KeyError, match="duplicate id 'late'"):
        h.push("late", PushesSameId(), "second")
    assert h.remove("late") == "first"
    h._check()


def test_key_conversion_that_mutates_the_input_lists_is_safe():
    h = ScoredHeap()
    keys: list = []
    ids = ["a", "b", "c"]
    objs = ["A", "B", "C"]

    class Shrinks:
        def __float__(self):
            keys.clear()  # the list being converted
            objs.pop()
            return 1.0

    keys.extend([Shrinks(), 2.0, 3.0])
    with pytest.raises(ValueError, match="same length"):
        h.push_many(ids, keys, objs)  # converted a private copy of keys; objs shrank to 2
    assert not h
    keys.extend([Shrinks(), 2.0, 3.0])
    objs[:] = ["A", "B", "C", "D"]
    h.push_many(ids, keys, objs)  # objs shrinks back to 3 during the conversion
    assert list(h.items()) == [("a", 1.0, "A"), ("b", 2.0, "B"), ("c", 3.0, "C")]


def test_finalizers_that_reenter_the_heap_during_clear_are_safe():
    h = ScoredHeap()
    log = []

    class Reenters:
        def __init__(self, i):
            self.i = i

        def __del__(self):
            log.append(len(h))
            h.push(f"from-del-{self.i}", float(self.i), "ghost")
            h._check()

    h.push_many([f"r{i}" for i in range(5)], list(range(5)), [Reenters(i) for i in range(5)])
    h.clear()
    # The heap was already empty when the first finalizer ran.
    assert log == [0, 1, 2, 3, 4]
    assert list(h) == ["ghost"] * 5
    h._check()


def test_finalizer_run_by_a_removal_can_reenter():
    h = ScoredHeap()
    deaths = []

    class Reenters:
        def __del__(self):
            deaths.append(len(h))
            h.push(f"from-del-{len(deaths)}", -1.0, "ghost")

    h.push("a", 1.0, Reenters())
    h.push("b", 2.0, "B")
    h.remove("a")  # the returned object dies here, once the heap is consistent again
    h._check()
    assert deaths == [1] and list(h) == ["ghost", "B"]
    h.push("c", -5.0, Reenters())
    h.pop()
    h._check()
    assert deaths == [1, 2] and list(h.items()) == [("from-del-1", -1.0, "ghost"), ("from-del-2", -1.0, "ghost"), ("b", 2.0, "B")]


# ------------------------------------------------------------------ stress --


def test_stress_one_million_operations_against_heapq():
    """1e6 mixed operations; every pop is checked against a heapq reference
    (lazy deletion), and the invariants and final contents at the end."""
    rng = np.random.default_rng(1234)
    n_ops = 1_000_000
    ops = rng.choice(4, size=n_ops, p=[0.5, 0.3, 0.1, 0.1]).tolist()  # push, pop, remove, update: grows to ~1e5
    keys = rng.integers(0, 1000, size=n_ops).astype(np.float64).tolist()  # ties are frequent
    picks = rng.random(n_ops).tolist()
    h = ScoredHeap()
    ref: list[tuple[float, int, str]] = []  # (key, seq, id)
    live: dict[str, tuple[float, int]] = {}
    live_ids: list[str] = []  # for random picks; swap-remove keeps it O(1)
    where: dict[str, int] = {}
    seq = 0
    push, pop, remove, update = h.push, h.popitem, h.remove, h.update
    ref_push, ref_pop = heapq.heappush, heapq.heappop

    for step in range(n_ops):
        op = ops[step]
        if op == 0 or not live_ids:
            id_ = f"s{step}"
            key = keys[step]
            push(id_, key, None)
            live[id_] = (key, seq)
            ref_push(ref, (key, seq, id_))
            where[id_] = len(live_ids)
            live_ids.append(id_)
            seq += 1
            continue
        if op == 1:
            while live.get(ref[0][2]) != ref[0][:2]:
                ref_pop(ref)  # stale: removed or updated since
            key, _, id_ = ref_pop(ref)
            assert pop()[:2] == (id_, key)
        elif op == 2:
            id_ = live_ids[int(picks[step] * len(live_ids))]
            remove(id_)
        else:
            id_ = live_ids[int(picks[step] * len(live_ids))]
            key, old_seq = keys[step], live[id_][1]
            update(id_, key)  # an update keeps the entry's seq
            live[id_] = (key, old_seq)
            ref_push(ref, (key, old_seq, id_))
            continue
        # Forget a popped or removed id; swap-remove keeps live_ids O(1).
        i = where.pop(id_)
        last = live_ids.pop()
        if last != id_:
            live_ids[i] = last
            where[last] = i
        del live[id_]
    h._check()
    want = sorted((k, s, i) for i, (k, s) in live.items())
    assert [(i, k) for i, k, _ in h.items()] == [(i, k) for k, _, i in want]
    assert len(h) == len(live) > 1000


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
    assert public == set(documented) - {"_T", "_Reals"}
    for cls_name, methods in documented.items():
        for method in methods:
            assert hasattr(getattr(_heap, cls_name), method), f"{cls_name}.{method}"
    for cls_name in ("ScoredHeap", "RequestHeap"):
        cls = getattr(_heap, cls_name)
        actual = {n for n in vars(cls) if not n.startswith("__")} | {"__init__", "__iter__", "__len__"}
        assert actual <= documented[cls_name] | {"__new__"}, actual - documented[cls_name]
