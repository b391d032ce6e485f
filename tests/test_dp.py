"""PARSScheduler under vLLM data parallelism, on real CPU engines.

``data_parallel_size=2`` through ``AsyncLLM`` (what ``vllm serve --data-parallel-size 2``
runs): vLLM starts two engine-core processes, each builds its own ``PARSScheduler`` by
name, and the client's load balancer (``DPLBAsyncMPClient``) spreads requests over them.
The tiny random Llama serves; the ranker is ``"oracle"`` (each request's ``max_tokens``),
so no ranker is trained and the expected order is exact.

1. A load-balanced burst: every request is served exactly once, with its full length,
   both ranks take part, and the per-rank stats files (``stats_file`` with
   ``{dp_rank}``) add up to the requests sent.
2. Requests pinned to a rank (``data_parallel_rank=``, as a router or an external load
   balancer does): behind a running blocker, each rank serves its own burst shortest
   first, so each engine core orders its own queue, and the pinned counts land in the
   right rank's stats.

Two engine cores take ~1.5 min to start on 2 cores, so this is opt-in: ``make test-dp``
(``pytest -m dp``). A recorded run is in docs/ARCHITECTURE.md ("Scaling out").
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.dp]

DP = 2
N_BALANCED = 40
# Per rank: a long blocker, then a burst of distinct lengths sent while it runs.
BLOCKER_TOKENS = 150
PINNED = {0: [9, 3, 14, 6, 11, 2, 8], 1: [5, 12, 1, 10, 4, 13, 7]}
TIMEOUT_S = 300


def _engine_args(model_dir: Path, stats_dir: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=512,
        max_num_seqs=1,  # one slot per rank: a rank's finish order is its scheduler's order
        enforce_eager=True,
        seed=0,
        data_parallel_size=DP,
        scheduler_cls="pars_fast.vllm.PARSScheduler",
        additional_config={
            "pars": {"ranker": "oracle", "aging": 0.0, "stats_file": str(stats_dir / "stats-{dp_rank}.json")}
        },
    )


def _read_stats(stats_dir: Path) -> dict[int, dict]:
    return {rank: json.loads((stats_dir / f"stats-{rank}.json").read_text()) for rank in range(DP)}


async def _serve(model_dir: Path, stats_dir: Path) -> dict:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    finished: list[str] = []  # request ids in the order their final output reached the client

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)

    async def run(engine, request_id: str, prompt, max_tokens: int, rank: int | None, started=None) -> dict:
        last = None
        async for out in engine.generate(prompt, params(max_tokens), request_id, data_parallel_rank=rank):
            if started is not None and not started.is_set():
                started.set()  # first token: the request is running
            last = out
        finished.append(request_id)
        return {
            "id": last.request_id,
            "max_tokens": max_tokens,
            "tokens": len(last.outputs[0].token_ids),
            "finish_reason": last.outputs[0].finish_reason,
        }

    result: dict = {}
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(_engine_args(model_dir, stats_dir))
    result["start_s"] = time.monotonic() - t0
    try:
        rng = random.Random(0)
        lengths = [rng.randint(1, 24) for _ in range(N_BALANCED)]
        prompts = engine.renderer.render_cmpl([{"prompt_token_ids": [101, 2000 + i, 2001 + i, 102]} for i in range(N_BALANCED)])

        # 1. Load-balanced burst.
        t1 = time.monotonic()
        tasks = [run(engine, f"lb-{i}", prompts[i], lengths[i], None) for i in range(N_BALANCED)]
        result["balanced"] = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        result["balanced_s"] = time.monotonic() - t1
        result["stats_after_balanced"] = _read_stats(stats_dir)

        # 2. Pinned bursts, one per rank, each behind a running blocker on its rank.
        finished.clear()
        t2 = time.monotonic()
        blockers, started = [], {rank: asyncio.Event() for rank in PINNED}
        for rank in PINNED:
            blockers.append(asyncio.ensure_future(run(engine, f"blocker-{rank}", prompts[rank], BLOCKER_TOKENS, rank, started[rank])))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), TIMEOUT_S)
        pinned = [
            run(engine, f"r{rank}-{n}", prompts[10 + 10 * rank + k], n, rank)
            for rank, ns in PINNED.items()
            for k, n in enumerate(ns)
        ]
        result["pinned"] = await asyncio.wait_for(asyncio.gather(*blockers, *pinned), TIMEOUT_S)
        result["pinned_finish_order"] = list(finished)
        result["pinned_s"] = time.monotonic() - t2
        result["stats_after_pinned"] = _read_stats(stats_dir)
    finally:
        engine.shutdown()
        del engine
        gc.collect()  # while modules are alive: AsyncLLM.__del__ at exit would fail noisily
    result["lengths"] = lengths
    return result


@pytest.fixture(scope="module")
def dp_run(tiny_llama_dir, tmp_path_factory):
    stats_dir = tmp_path_factory.mktemp("dp-stats")
    old = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB per engine core
    try:
        result = asyncio.run(_serve(tiny_llama_dir, stats_dir))
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = old
    per_rank = {r: s["requests_scored"] for r, s in result["stats_after_balanced"].items()}
    print(
        f"\nDP={DP}: engines up in {result['start_s']:.1f} s; {N_BALANCED} balanced requests in "
        f"{result['balanced_s']:.2f} s, per rank {per_rank}; pinned bursts in {result['pinned_s']:.2f} s"
    )
    return result


def test_every_balanced_request_is_served_once_with_its_full_length(dp_run):
    served = dp_run["balanced"]
    assert sorted(r["id"] for r in served) == sorted(f"lb-{i}" for i in range(N_BALANCED))
    for r in served:
        assert r["tokens"] == r["max_tokens"] and r["finish_reason"] == "length", r


def test_each_rank_scores_its_share_and_the_counts_add_up(dp_run):
    stats = dp_run["stats_after_balanced"]
    assert set(stats) == set(range(DP))
    for rank, s in stats.items():
        assert s["ranker"] == "oracle" and s["requests_fallback"] == 0, (rank, s)
        assert s["requests_scored"] > 0, f"rank {rank} got no request: {stats}"  # both ranks serve
    assert sum(s["requests_scored"] for s in stats.values()) == N_BALANCED


def test_pinned_requests_land_on_their_rank(dp_run):
    before, after = dp_run["stats_after_balanced"], dp_run["stats_after_pinned"]
    for rank, ns in PINNED.items():
        assert after[rank]["requests_scored"] - before[rank]["requests_scored"] == 1 + len(ns), rank
    served = dp_run["pinned"]
    assert len(served) == len({r["id"] for r in served}) == DP + sum(map(len, PINNED.values()))
    assert all(r["tokens"] == r["max_tokens"] for r in served)


def test_each_rank_serves_its_queue_shortest_first(dp_run):
    order = dp_run["pinned_finish_order"]
    for rank, ns in PINNED.items():
        mine = [rid for rid in order if rid == f"blocker-{rank}" or rid.startswith(f"r{rank}-")]
        assert mine == [f"blocker-{rank}"] + [f"r{rank}-{n}" for n in sorted(ns)], (rank, mine)
