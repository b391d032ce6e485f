"""Simulated serving: vLLM's own V1 scheduler, stepped on a virtual clock.

The scheduler code is real (vLLM's ``Scheduler``, ``PARSScheduler``, the real KV cache
manager); only the forward pass is replaced by a cost model that prices each step.
"""
