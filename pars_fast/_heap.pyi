"""Type stub for pars_fast._heap, the C++ extension (csrc/).

Use it through pars_fast.queue (ScoredRequestQueue, NotQueuedError).
Every type here holds strong references to its objects, takes part in cyclic
garbage collection, and stays consistent if Python code it triggers (__float__,
properties, __del__) re-enters it.
"""

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__version__: str
#: Arity of the heap (children per node).
ARITY: int

_T = TypeVar("_T")

class NotQueuedError(KeyError, ValueError):
    """An id or request is not in the heap/queue.

    A KeyError (unknown key), and a ValueError because vLLM's queues raise
    ValueError from remove_request (list.remove / deque.remove).
    """

class HeapIterator(Iterator[_T]):
    """Queued objects in pop order, from a snapshot of the heap taken at the first next()."""

    def __next__(self) -> _T: ...
    def __length_hint__(self) -> int: ...

class RequestHeap:
    """C++ body of pars_fast.queue.ScoredRequestQueue: vLLM's RequestQueue over an indexed heap.

    A request is stored under request.request_id and comes out in ascending
    (request.priority, request.arrival_time) order, then insertion order. Both are
    read as doubles when the request is added or updated; the queue adds nothing to
    them (aging is in the priority the scheduler sets: pars_fast.aging).
    """

    def __init__(self) -> None:
        """Takes no arguments."""
    def add_request(self, request: Any) -> None:
        """KeyError if a request with the same request_id is queued."""
    def pop_request(self) -> Any:
        """IndexError("pop from empty heap") if empty."""
    def peek_request(self) -> Any:
        """IndexError("peek from empty heap") if empty."""
    def prepend_request(self, request: Any) -> None:
        """Same as add_request (a priority queue has no front to prepend to)."""
    def prepend_requests(self, requests: Iterable[Any]) -> None:
        """Add all by priority, all or nothing."""
    def remove_request(self, request: Any) -> None:
        """NotQueuedError (KeyError and ValueError) if this request object is not queued."""
    def remove_requests(self, requests: Iterable[Any]) -> None:
        """Requests that are not queued are ignored (as in vLLM)."""
    def update_request(self, request: Any) -> None:
        """Re-read the request's priority and arrival_time after either changed."""
    def key_of(self, request: Any) -> float:
        """The priority the request is stored under, as a float (read at its last add or update)."""
    def clear(self) -> None: ...
    def _check(self) -> None: ...
    def __iter__(self) -> HeapIterator[Any]: ...
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    def __contains__(self, request: object) -> bool: ...
