"""The scored waiting queue: vLLM's ``RequestQueue`` on a C++ indexed heap.

``ScoredRequestQueue`` is a drop-in for vLLM 0.32's ``PriorityRequestQueue``
(``vllm/v1/core/sched/request_queue.py``), method for method and with the same
semantics: requests come out in ascending ``(priority, arrival_time)`` order,
``prepend_request(s)`` re-insert by priority, an empty pop or peek raises
``IndexError``, ``remove_requests`` ignores requests that are not queued, and
``__iter__`` yields requests in pop order from a snapshot. What changes is the
cost: every method is one call into C++ (``pars_fast._heap``), and removal is
O(log n) through an id index instead of vLLM's O(n) ``list.remove`` + heapify.

Order. Requests come out in ascending ``(request.priority, request.arrival_time)``,
then insertion order (FIFO): exactly vLLM's order (``Request.__lt__``), except
that vLLM breaks a tie on both priority and arrival_time by ``request_id`` and
this queue by insertion order. The queue reads these attributes when a request is
added (or ``update_request`` is called) and adds nothing to them: aging against
starvation is folded into ``request.priority`` by the scheduler
(``pars_fast.aging``), so that vLLM's preemption, which reads the same priority,
agrees with the order of this queue. Priorities are compared as doubles, which
holds vLLM's int priorities exactly up to 2**53.
"""

from __future__ import annotations

import sys

from pars_fast import _heap

__all__ = [
    "NotQueuedError",
    "ScoredRequestQueue",
    "register_with_vllm",
]

#: Raised for an unknown id or a request that is not queued; both a KeyError
#: and a ValueError (vLLM's ``remove_request`` raises ValueError).
NotQueuedError = _heap.NotQueuedError

_VLLM_QUEUE_MODULE = "vllm.v1.core.sched.request_queue"


class ScoredRequestQueue(_heap.RequestHeap):
    """vLLM's ``RequestQueue`` interface over a C++ indexed min-heap.

    Requests need ``request_id`` (str, unique in the queue), ``priority`` and
    ``arrival_time`` (real numbers, not NaN). Besides vLLM's methods the queue
    has ``update_request(request)`` (re-read the priority after it changed,
    O(log n)), ``request in queue`` (O(1)), ``key_of(request)`` (the priority
    it is stored under) and ``clear()``.

    A thin subclass of the C++ type: every method is the C++ one. It exists
    so that constructing a queue registers it with vLLM's ``RequestQueue``
    ABC once vLLM is loaded (a C type cannot inherit an ``ABCMeta`` class).
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()
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


register_with_vllm()
