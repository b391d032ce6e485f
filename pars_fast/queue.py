"""The scored waiting queue: vLLM's ``RequestQueue`` on a C++ indexed heap.

``ScoredRequestQueue`` is a drop-in for vLLM 0.32's ``PriorityRequestQueue``
(``vllm/v1/core/sched/request_queue.py``), method for method and with the same
semantics: requests come out in ascending ``(priority, arrival_time)`` order,
``prepend_request(s)`` re-insert by key, an empty pop or peek raises
``IndexError``, ``remove_requests`` ignores requests that are not queued, and
``__iter__`` yields requests in pop order from a snapshot. What changes is the
cost: every method is one call into C++ (``pars_fast._heap``), and removal is
O(log n) through an id index instead of vLLM's O(n) ``list.remove`` + heapify.

Order. A request is stored under ``request.request_id`` with::

    key = base + aging_rate * arrival_time      (base = key(request) or request.priority)
    tie = arrival_time, then insertion order

With ``aging_rate = 0`` and no key function this is exactly vLLM's order
(``Request.__lt__``), except that vLLM breaks a tie on both priority and
arrival_time by ``request_id`` and this queue by insertion order (FIFO).

Aging against starvation. Lower keys are served first, so a long (high-score)
request could wait forever behind a steady stream of short ones. Aging adds
``aging_rate * arrival_time`` to every key: a request that arrives later gets a
larger key, so a request that has waited long enough is ahead of every new
arrival. Because the term depends on the arrival time, not on the current
time, keys never need to be recomputed and the heap stays valid (every queued
request "ages" at the same rate, which leaves their relative order unchanged).
The bound: a request arriving at ``t_a`` with score ``s`` is served before any
request that arrives after ``t_a + (s - s_min) / aging_rate``, where ``s_min`` is
the smallest score any request can have. So its wait is at most
``(s_max - s_min) / aging_rate`` plus the time to serve the requests queued
ahead of it by then (see ``aging_wait_bound``). ``aging_rate`` is in score units
per second of ``arrival_time``; ``aging_rate = 0`` disables aging.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from pars_fast import _heap

__all__ = [
    "NotQueuedError",
    "ScoredRequestQueue",
    "aging_wait_bound",
    "register_with_vllm",
]

#: Raised for an unknown id or a request that is not queued; both a KeyError
#: and a ValueError (vLLM's ``remove_request`` raises ValueError).
NotQueuedError = _heap.NotQueuedError

_VLLM_QUEUE_MODULE = "vllm.v1.core.sched.request_queue"


class ScoredRequestQueue(_heap.RequestHeap):
    """vLLM's ``RequestQueue`` interface over a C++ indexed min-heap.

    Args:
        key: ``key(request) -> float``, the base sort key; ``None`` (the
            default) reads ``request.priority`` in C++, which is fastest.
        aging_rate: score units a request gains per second of waiting
            (>= 0; 0 disables aging). See the module docstring for the bound.

    Requests need ``request_id`` (str, unique in the queue), ``arrival_time``
    and, without a key function, ``priority``. Besides vLLM's methods the
    queue has ``update_request(request)`` (re-read the key after
    ``request.priority`` changed, O(log n)), ``request in queue`` (O(1)),
    ``key_of(request)`` and ``clear()``.

    A thin subclass of the C++ type: every method is the C++ one. It exists
    so that constructing a queue registers it with vLLM's ``RequestQueue``
    ABC once vLLM is loaded (a C type cannot inherit an ``ABCMeta`` class).
    """

    __slots__ = ()

    def __init__(self, key: Callable[[Any], float] | None = None, aging_rate: float = 0.0) -> None:
        super().__init__(key, aging_rate)
        if not _registered:
            register_with_vllm()


_registered = False


def register_with_vllm() -> bool:
    """Register ``ScoredRequestQueue`` as a virtual subclass of vLLM's ``RequestQueue``.

    Does nothing (and returns False) while vLLM is not imported: importing it
    takes seconds, and ``pars_fast.queue`` must stay cheap to import. It runs
    at import of this module and at each construction of a queue until it
    succeeds, so ``isinstance(queue, RequestQueue)`` holds for any queue made
    after vLLM was imported (the scheduler always imports vLLM first).
    """
    global _registered
    module = sys.modules.get(_VLLM_QUEUE_MODULE)
    if module is None:
        return False
    module.RequestQueue.register(ScoredRequestQueue)
    _registered = True
    return True


def aging_wait_bound(s_min: float, s_max: float, aging_rate: float) -> float:
    """Longest time a request can be overtaken by later arrivals under aging.

    A request with score ``s`` in ``[s_min, s_max]`` is served before every
    request that arrives more than ``(s - s_min) / aging_rate`` seconds after
    it, so ``(s_max - s_min) / aging_rate`` bounds the window in which new
    arrivals can overtake it; its total wait is this plus the time to serve
    the requests that were ahead of it when the window closed.
    Returns ``inf`` when ``aging_rate`` is 0 (no aging, no bound).
    """
    if not (s_max >= s_min):
        raise ValueError(f"aging_wait_bound: need s_min <= s_max, got {s_min} > {s_max}")
    if not (aging_rate >= 0.0) or math.isinf(aging_rate):
        raise ValueError(f"aging_wait_bound: aging_rate must be finite and >= 0, got {aging_rate}")
    return math.inf if aging_rate == 0.0 else (s_max - s_min) / aging_rate


register_with_vllm()
