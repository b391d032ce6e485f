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
