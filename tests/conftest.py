"""Shared pytest set-up.

TRITON_INTERPRET must be set before any Triton kernel is decorated, so it is set
here, before the test modules import pars_fast.kernels. On a CUDA machine, set
TRITON_INTERPRET=0 explicitly to run the kernels on the GPU instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir():
    from pars_fast.tiny_llama import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random-weight Llama (BERT tokenizer) for real vLLM engines and schedulers."""
    from pars_fast.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def one_blas_thread():
    """The Triton interpreter runs each tl.dot as a small numpy matmul; multi-threaded
    OpenBLAS makes those up to 100x slower on a busy 2-core machine (measured: 41 ms vs
    0.4 ms). Kernel test modules request this with ``pytest.mark.usefixtures``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only makes the interpreter faster
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
