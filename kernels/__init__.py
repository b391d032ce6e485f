"""Fused Triton kernels for the ranker's BERT encoder (installed as ``pars_fast.kernels``).

The forward pass runs on a packed, padding-free batch: every prompt's tokens are
concatenated into ``[total_tokens, hidden]`` with ``cu_seqlens`` offsets.
"""
