"""Step cost models: how long one vLLM engine step takes on a GPU.

The simulator runs vLLM's real V1 scheduler on a virtual clock; each engine step (one
``schedule()`` plus the forward pass it scheduled) is priced by a ``StepCost``. A step is
described by a ``StepBatch``: the prefill chunks (tokens computed this step, tokens already in
the request's KV cache) and the decoding requests (their context lengths).

Two models, built with ``build_cost_model(kind, model=..., gpu=..., tp=...)``:

``aiconfigurator`` (``AIConfiguratorCost``; needs the ``sim`` extra: ``aiconfigurator-core``)
    NVIDIA's per-kernel timings measured under vLLM (the ``h100_sxm`` tables are vLLM 0.24.0
    runs), composed per step the way aiconfigurator composes a mixed step, with tensor
    parallelism (all-reduces included) handled by aiconfigurator itself:

    * non-attention ops (GEMMs, norms, activations, all-reduces) at ``T`` = all tokens of the
      step (prefill chunks + one per decoding request);
    * the logits GEMM at one row per scheduled request (vLLM computes logits only there);
    * prefill attention as one batch of ``b`` chunks with ``Q`` new tokens in all: every
      chunk at the mean ``Q/b`` new tokens, with the cached prefix chosen so the batch does
      the same attention work (query-key pairs, ``sum n*(k + (n+1)/2)``) as the real chunks;
    * decode attention as ``d`` requests at the **mean** context, ``K/d`` with ``K`` the KV
      tokens they read. Decode attention is bound by reading the KV cache, so its time follows
      the total KV read, which the mean keeps exactly; the longest context would charge for
      KV that is never read. The cost: a batch with a few very long contexts is priced as if
      evenly spread, and one request much shorter than the rest lowers the mean, so adding
      it can make the step up to ~1% cheaper (never a request at or above the mean).

    Prefill and decode attention are two kernels in this composition, each with its own
    fixed cost (~0.4 ms for Llama-3.1-8B); vLLM V1 runs one attention kernel per layer for
    both, so a mixed step is charged that fixed part twice (~2% of such a step).

    It prices the forward pass only, so a fixed per-step overhead is added
    (``DEFAULT_OVERHEAD_S``, 0.3 ms unless ``overhead_s`` says otherwise): sampling, input
    preparation and the launch gap between steps. vLLM 0.32 turns async scheduling on by
    default on GPUs, which overlaps ``schedule()`` and output processing with the forward
    pass, so scheduler time is not in it (while the scheduler is faster than the GPU). The
    0.3 ms is an estimate, not a measurement (no GPU was at hand): sampling reads the
    ``rows x vocab`` float32 logits a few times (0.05-0.5 ms on an H100 for 1-1024 rows),
    plus ~0.1 ms of host-to-device input copies.

    Memoization on bucketed inputs. A query costs aiconfigurator 2-600 us and a simulation
    asks ~10^5-10^6 times, so each term is sampled once per (model, GPU, TP) on a fixed grid
    and interpolated (multilinear) between nodes: step tokens and logits rows exact to 512
    then 64 and 32 nodes per octave; decode requests exact to 8, mean context exact to 16,
    then 4 per octave; prefill chunks 1 per octave, new tokens per chunk and cached prefix
    2 per octave. That is harmless because aiconfigurator's own attention tables are coarser
    (powers of two in batch, ~2 points per octave in length, interpolated in between) and
    each term is close to affine between nodes: on random realistic steps the grid is within
    0.14% of direct queries at the median (``tests/test_sim_costs.py`` checks it). Building
    the grids takes ~2 s per (model, GPU, TP) and compiling aiconfigurator's engine ~4 s,
    once per process.

    Monotone. The sampled grid is replaced by the nearest grid that never falls as any input
    grows (isotonic regression of the log values along each axis): more tokens, requests,
    context or prefix never make a step cheaper. aiconfigurator's tables zigzag by a few
    percent (its GEMM interpolation between measured sizes; its prefix model prices a tiny
    chunk over a long cached prefix up to ~45% below the same chunk with none); a simulator
    that rewarded more work would be wrong in a way that is hard to see. The regression
    moves a step at most ~6% from the direct query and keeps every node above the HBM floor.

``linear`` (``LinearCost``)
    ``beta0 + beta1*prefill tokens + beta2*decode tokens + beta3*KV tokens read``: BLIS's
    form plus a context term (without one a fit falls below the HBM floor at large
    batch x context). Presets ship for Llama-3.1-8B on 1 H100 SXM and Llama-3.1-70B on
    4 H100 SXM (TP=4), fitted to the ``aiconfigurator`` model (overhead included) by
    ``benchmarks/fit_linear_presets.py`` with ``beta0`` and ``beta3`` held at or above the
    weight and KV read floors, so a preset can never price a step under physics. A line
    cannot follow a GEMM's flat-then-linear cost: against the aiconfigurator model the 8B
    preset is off by 7% at the median step, 12% at worst on decode steps and up to 34% on
    small prefill-only ones (each preset's ``"fit"`` entry has the numbers).

Coefficients file (``LinearCost.to_file`` / ``from_file``; ``pars-fast sim calibrate`` writes
it from step times measured on a real engine). One JSON object::

    {"kind": "linear",                      # required, always "linear"
     "beta0_s": 0.0061,                     # required: seconds per step
     "prefill_s_per_token": 2.0e-05,        # required: seconds per prefill token computed
     "decode_s_per_token": 7.0e-06,         # required: seconds per decoding request
     "context_s_per_token": 4.2e-08,        # required: seconds per KV token read
     "source": "fitted to ...",             # required: where the numbers come from
     "model": "meta-llama/Meta-Llama-3.1-8B", "gpu": "h100_sxm", "tp": 1,   # optional
     "overhead_s": 0.0003,                  # optional: the per-step overhead inside beta0
     ...}                                   # any other keys: kept as metadata, written back

The four coefficients are finite, >= 0 and not all 0. When ``model``/``gpu``/``tp`` are present,
``build_cost_model`` refuses the file for another model, GPU or TP.

Also here: ``roofline_floor_s`` (weights + KV read per GPU / HBM bandwidth, the least any
step can take), ``kv_capacity_blocks`` (the KV blocks vLLM allocates), and
``vllm_serving_defaults`` (the batch limits vLLM 0.32's OpenAI server picks on a GPU).
Model and GPU specs come from a small built-in table (not from aiconfigurator's configs),
so the floor, the KV capacity and the linear presets work without the optional extra and
do not change with what is installed; a test checks the table against aiconfigurator's
shipped configs when it is importable.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.metadata
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AIConfiguratorCost",
    "CostModelError",
    "DEFAULT_OVERHEAD_S",
    "GPUSpec",
    "LinearCost",
    "ModelSpec",
    "StepBatch",
    "StepCost",
    "available_gpus",
    "available_models",
    "build_cost_model",
    "gpu_spec",
    "kv_capacity_blocks",
    "model_spec",
    "roofline_floor_s",
    "vllm_serving_defaults",
]

# Sampling + input preparation + launch gap per step, on top of aiconfigurator's forward
# pass (module docstring: why 0.3 ms, and why the scheduler's own time is not in it).
DEFAULT_OVERHEAD_S = 3e-4

KINDS = ("aiconfigurator", "linear")
AICONFIGURATOR_VERSION = "0.12.0"  # what the `sim` extra pins; the tests' reference numbers are from it


class CostModelError(ValueError):
    """A cost model cannot be built: unknown model/GPU/kind, bad coefficients, missing extra."""


# --------------------------------------------------------------------------------------
# What one step computes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepBatch:
    """What one engine step computes.

    ``prefill_chunks``: one ``(n, k)`` per request prefilling this step: ``n`` tokens computed
    this step, ``k`` tokens already in its KV cache before the step (prefix-cache hits plus
    earlier chunks). ``decode_contexts``: one entry per decoding request (one new token
    each), its context length in tokens (the KV tokens the new token attends to).
    """

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    decode_contexts: tuple[int, ...] = ()

    @property
    def prefill_tokens(self) -> int:
        """Tokens computed by prefill chunks this step."""
        return sum(n for n, _ in self.prefill_chunks)

    @property
    def decode_tokens(self) -> int:
        """Tokens computed by decoding requests (one each)."""
        return len(self.decode_contexts)

    @property
    def num_reqs(self) -> int:
        """Requests scheduled this step (each gets one logits row)."""
        return len(self.prefill_chunks) + len(self.decode_contexts)

    @property
    def kv_read_tokens(self) -> int:
        """KV tokens attention reads this step: each chunk its cached prefix and its own new
        tokens (vLLM writes them to the paged cache, then attends over it), each decoding
        request its context."""
        return sum(n + k for n, k in self.prefill_chunks) + sum(self.decode_contexts)


@runtime_checkable
class StepCost(Protocol):
    """Prices one engine step. ``name`` identifies the model, ``description`` is one line
    for reports: where the numbers come from and what is added."""

    name: str
    description: str

    def step_s(self, batch: StepBatch) -> float:
        """Seconds of one engine step."""
        ...


# --------------------------------------------------------------------------------------
# Model and GPU specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder's shape, enough for weight bytes and KV bytes per token."""

    name: str  # aiconfigurator's / Hugging Face's id
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm on q and on k in every layer
    bytes_per_param: int = 2  # bf16 weights
    kv_bytes_per_elem: int = 2  # bf16 KV cache (vLLM's "auto" for a bf16 model)

    @property
    def params(self) -> int:
        """Parameter count (embeddings, attention, MLP, norms, LM head)."""
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + norms) + embed + self.hidden

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights."""
        return self.params * self.bytes_per_param

    def check_tp(self, tp: int) -> None:
        """Raise CostModelError unless vLLM can shard this model ``tp`` ways."""
        if not isinstance(tp, int) or tp < 1:
            raise CostModelError(f"tp must be a positive integer, got {tp!r}")
        if self.heads % tp:
            raise CostModelError(f"{self.name}: {self.heads} attention heads do not split over tp={tp}")
        if self.kv_heads % tp and tp % self.kv_heads:
            raise CostModelError(f"{self.name}: {self.kv_heads} KV heads do not split over tp={tp}")

    def weight_bytes_per_gpu(self, tp: int = 1) -> int:
        """Weight bytes on one of ``tp`` ranks (vLLM shards every matrix, vocab included;
        the replicated norms are a few hundred KB and left out)."""
        self.check_tp(tp)
        return -(-self.weight_bytes // tp)

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV cache bytes per token on one rank: K and V, every layer. Ranks split the KV
        heads; with more ranks than KV heads vLLM replicates them (one head per rank)."""
        self.check_tp(tp)
        heads = max(1, self.kv_heads // tp)
        return 2 * self.layers * heads * self.head_dim * self.kv_bytes_per_elem


# From each model's Hugging Face config.json (the same files aiconfigurator ships under
# aiconfigurator_core/model_configs/; tests compare them when it is installed).
_MODELS = (
    ModelSpec("meta-llama/Meta-Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    ModelSpec("meta-llama/Meta-Llama-3.1-70B", 80, 8192, 64, 8, 128, 28672, 128256),
    ModelSpec("meta-llama/Meta-Llama-3.1-405B", 126, 16384, 128, 8, 128, 53248, 128256),
    ModelSpec("Qwen/Qwen3-8B", 36, 4096, 32, 8, 128, 12288, 151936, qk_norm=True),
    ModelSpec("Qwen/Qwen3-32B", 64, 5120, 64, 8, 128, 25600, 151936, qk_norm=True),
)


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: memory as the driver reports it (what vLLM reads) and HBM bandwidth."""

    name: str  # aiconfigurator's system name
    device_name: str  # what NVML / torch.cuda.get_device_name report
    memory_bytes: int
    hbm_bytes_per_s: float


_MiB = 1 << 20
_GiB = 1 << 30
# Memory: nvidia-smi's total (NVML, which vLLM's batch defaults read). Bandwidth: NVIDIA's
# datasheets (the same figures as aiconfigurator's systems/*.yaml).
_GPUS = (
    GPUSpec("a100_sxm", "NVIDIA A100-SXM4-80GB", 81920 * _MiB, 2.039e12),
    GPUSpec("h100_sxm", "NVIDIA H100 80GB HBM3", 81559 * _MiB, 3.35e12),
    GPUSpec("h100_pcie", "NVIDIA H100 PCIe", 81559 * _MiB, 2.0e12),
    GPUSpec("h200_sxm", "NVIDIA H200", 143771 * _MiB, 4.8e12),
    GPUSpec("b200_sxm", "NVIDIA B200", 183359 * _MiB, 7.7e12),
    GPUSpec("gb200", "NVIDIA GB200", 189471 * _MiB, 8.0e12),
    GPUSpec("l40s", "NVIDIA L40S", 46068 * _MiB, 8.64e11),
)


def _model_key(name: str) -> str:
    # "meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B" and aiconfigurator's
    # "meta-llama/Meta-Llama-3.1-8B" are one architecture: compare the bare lower-case name.
    key = name.strip().lower().rsplit("/", 1)[-1].removesuffix("-instruct")
    return key.removeprefix("meta-")


def _gpu_key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


_MODEL_BY_KEY = {_model_key(m.name): m for m in _MODELS}
_GPU_BY_KEY = {g.name: g for g in _GPUS}
_GPU_ALIASES = {"a100": "a100_sxm", "h100": "h100_sxm", "h200": "h200_sxm", "b200": "b200_sxm"}


def available_models() -> list[str]:
    """Model names the cost models, floor and KV capacity know (aiconfigurator's ids)."""
    return [m.name for m in _MODELS]


def available_gpus() -> list[str]:
    """GPU names known here (aiconfigurator's system names)."""
    return [g.name for g in _GPUS]


def model_spec(model: str) -> ModelSpec:
    """The spec of ``model``: aiconfigurator's id or the Hugging Face one, any case."""
    spec = _MODEL_BY_KEY.get(_model_key(model))
    if spec is None:
        raise CostModelError(f"unknown model {model!r}; choose from {', '.join(available_models())}")
    return spec


def gpu_spec(gpu: str) -> GPUSpec:
    """The spec of ``gpu``: aiconfigurator's system name ("h100_sxm"), or "h100", any case."""
    key = _gpu_key(gpu)
    spec = _GPU_BY_KEY.get(_GPU_ALIASES.get(key, key))
    if spec is None:
        raise CostModelError(f"unknown GPU {gpu!r}; choose from {', '.join(available_gpus())}")
    return spec


# --------------------------------------------------------------------------------------
# Physics and vLLM's own numbers
# --------------------------------------------------------------------------------------


def roofline_floor_s(batch: StepBatch, *, model: str, gpu: str, tp: int = 1) -> float:
    """The least time a step can take: every weight and every KV token attention reads,
    streamed once from HBM, per GPU (``(weight bytes + KV bytes read) / bandwidth``).
    Compute, launches and communication only add to it."""
    m, g = model_spec(model), gpu_spec(gpu)
    moved = m.weight_bytes_per_gpu(tp) + batch.kv_read_tokens * m.kv_bytes_per_token(tp)
    return moved / g.hbm_bytes_per_s


def kv_capacity_blocks(
    *, model: str, gpu: str, tp: int = 1, gpu_memory_utilization: float = 0.9, block_size: int = 16
) -> int:
    """KV cache blocks per rank, as vLLM sizes them: ``ceil(memory * utilization)`` minus the
    weights, divided by the bytes of one block (``block_size`` tokens, K and V, all layers).

    Left out: what vLLM's start-up profiling also subtracts, namely the activation peak of a
    ``max_num_batched_tokens`` forward pass, non-torch allocations (CUDA context, cuBLAS and
    NCCL buffers) and, since vLLM 0.21, the CUDA-graph pool estimate. Those are a few GiB at
    most, so a real engine gets a few percent fewer blocks than this. Memory is the total the
    driver reports; CUDA's own total is ~0.5 GiB lower on an H100.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise CostModelError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size < 1:
        raise CostModelError(f"block_size must be positive, got {block_size}")
    m, g = model_spec(model), gpu_spec(gpu)
    requested = math.ceil(g.memory_bytes * gpu_memory_utilization)  # vLLM's request_memory
    free = requested - m.weight_bytes_per_gpu(tp)
    blocks = free // (block_size * m.kv_bytes_per_token(tp))
    if blocks <= 0:
        raise CostModelError(
            f"{m.name} does not fit on {g.name} x{tp} at gpu_memory_utilization={gpu_memory_utilization}: "
            f"{m.weight_bytes_per_gpu(tp) / _GiB:.1f} GiB of weights per GPU, {requested / _GiB:.1f} GiB allowed"
        )
    return int(blocks)


def vllm_serving_defaults(gpu: str) -> dict:
    """The scheduler settings vLLM 0.32's OpenAI server picks on ``gpu`` when not told.

    Mirrors ``EngineArgs.get_batch_defaults`` (``UsageContext.OPENAI_API_SERVER``): >= 160 GiB
    of device memory: 1024 sequences / 16,384 batched tokens; >= 70 GiB and not an A100:
    1024 / 8,192; anything else: 256 / 2,048. Chunked prefill, prefix caching and async
    scheduling are on by default for a text model on a GPU; blocks are 16 tokens.
    """
    g = gpu_spec(gpu)
    if g.memory_bytes >= 160 * _GiB:
        seqs, tokens = 1024, 16384
    elif g.memory_bytes >= 70 * _GiB and "a100" not in g.device_name.lower():
        seqs, tokens = 1024, 8192
    else:
        seqs, tokens = 256, 2048
    return {
        "max_num_seqs": seqs,
        "max_num_batched_tokens": tokens,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": True,
        "async_scheduling": True,
        "block_size": 16,
    }


# --------------------------------------------------------------------------------------
# Linear model
# --------------------------------------------------------------------------------------

_LINEAR_KEYS = ("beta0_s", "prefill_s_per_token", "decode_s_per_token", "context_s_per_token")


@dataclass(frozen=True)
class LinearCost:
    """``beta0 + beta1*prefill tokens + beta2*decode tokens + beta3*KV tokens read`` seconds.

    ``metadata`` holds the file's other keys (model, gpu, tp, overhead_s, fit errors, ...) and
    is written back by ``to_file``. The file format is in the module docstring.
    """

    beta0_s: float
    prefill_s_per_token: float
    decode_s_per_token: float
    context_s_per_token: float
    source: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for key in _LINEAR_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CostModelError(f"linear cost: {key} must be a finite number >= 0, got {value!r}")
        if not any(getattr(self, key) > 0 for key in _LINEAR_KEYS):
            raise CostModelError("linear cost: every coefficient is 0, so every step would be free")

    @property
    def name(self) -> str:
        """``linear:<model>@<gpu>/tp<N>`` when the metadata says, else ``linear:<source>``."""
        meta = self.metadata
        if {"model", "gpu", "tp"} <= meta.keys():
            return f"linear:{meta['model']}@{meta['gpu']}/tp{meta['tp']}"
        return f"linear:{self.source}" if self.source else "linear"

    @property
    def description(self) -> str:
        """The coefficients in readable units, and their source."""
        return (
            f"linear: {self.beta0_s * 1e3:.3f} ms/step + {self.prefill_s_per_token * 1e6:.2f} us/prefill token"
            f" + {self.decode_s_per_token * 1e6:.2f} us/decode token"
            f" + {self.context_s_per_token * 1e9:.1f} ns/KV token read ({self.source})"
        )

    def step_s(self, batch: StepBatch) -> float:
        """Seconds of one engine step."""
        prefill = kv = 0
        for n, k in batch.prefill_chunks:
            prefill += n
            kv += n + k
        decode = len(batch.decode_contexts)
        kv += sum(batch.decode_contexts)
        return (
            self.beta0_s
            + self.prefill_s_per_token * prefill
            + self.decode_s_per_token * decode
            + self.context_s_per_token * kv
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``to_file`` writes."""
        out: dict[str, Any] = {"kind": "linear"}
        out.update({key: float(getattr(self, key)) for key in _LINEAR_KEYS})
        out["source"] = self.source
        out.update({k: v for k, v in self.metadata.items() if k not in out})
        return out

    def to_file(self, path: str | Path) -> None:
        """Write the coefficients file (format in the module docstring)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "linear cost") -> LinearCost:
        """Read a coefficients object; CostModelError names what is wrong."""
        if not isinstance(data, dict):
            raise CostModelError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("kind") != "linear":
            raise CostModelError(f"{where}: \"kind\" must be \"linear\", got {data.get('kind')!r}")
        missing = [key for key in (*_LINEAR_KEYS, "source") if key not in data]
        if missing:
            raise CostModelError(f"{where}: missing {', '.join(missing)}")
        meta = {k: v for k, v in data.items() if k not in (*_LINEAR_KEYS, "source", "kind")}
        try:
            return cls(*(data[key] for key in _LINEAR_KEYS), source=str(data["source"]), metadata=meta)
        except CostModelError as exc:
            raise CostModelError(f"{where}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> LinearCost:
        """Read a coefficients file written by ``to_file`` or ``pars-fast sim calibrate``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise CostModelError(f"cannot read linear cost file {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise CostModelError(f"linear cost file {path} is not JSON: {exc}") from None
        return cls.from_dict(data, where=str(path))


def _preset_filename(model: str, gpu: str, tp: int) -> str:
    return f"{_model_key(model_spec(model).name)}_{gpu_spec(gpu).name}_tp{tp}.json"


def _presets() -> dict[str, Any]:
    folder = resources.files("pars_fast.sim") / "presets"
    if not folder.is_dir():
        return {}
    return {p.name: p for p in folder.iterdir() if p.name.endswith(".json")}


def linear_preset(*, model: str, gpu: str, tp: int = 1) -> LinearCost:
    """The shipped linear coefficients for (model, GPU, TP)."""
    fname = _preset_filename(model, gpu, tp)
    presets = _presets()
    if fname not in presets:
        have = ", ".join(sorted(n.removesuffix(".json") for n in presets)) or "none"
        raise CostModelError(
            f"no linear preset for {model_spec(model).name} on {gpu_spec(gpu).name} tp={tp} (presets: {have}); "
            "pass file= a coefficients JSON (pars-fast sim calibrate writes one), or use kind 'aiconfigurator'"
        )
    return LinearCost.from_dict(json.loads(presets[fname].read_text()), where=f"preset {fname}")


# --------------------------------------------------------------------------------------
# aiconfigurator model
# --------------------------------------------------------------------------------------


def _grid(exact_to: int, per_octave: int, top: int) -> list[int]:
    """Integers 1..exact_to, then ``per_octave`` geometric steps per doubling up to >= top."""
    nodes = set(range(1, exact_to + 1))
    i = 1
    while True:
        x = round(exact_to * 2 ** (i / per_octave))
        nodes.add(x)
        if x >= top:
            return sorted(nodes)
        i += 1


def _locate(grid: list[int], x: float) -> tuple[int, float, float]:
    """(i, weight of grid[i+1], scale): x between grid[i] and grid[i+1]; beyond the top, the
    top cell at weight 1 and scale x/top (work past the grid costs proportionally more)."""
    i = bisect.bisect_right(grid, x) - 1
    if i < 0:
        return 0, 0.0, 1.0
    if i >= len(grid) - 1:
        return len(grid) - 2, 1.0, x / grid[-1]
    lo = grid[i]
    return i, (x - lo) / (grid[i + 1] - lo), 1.0


def _interp1(grid: list[int], vals: list[float], x: float) -> float:
    i, w, scale = _locate(grid, x)
    return (vals[i] + w * (vals[i + 1] - vals[i])) * scale


def _interp2(g0: list[int], g1: list[int], vals: list[list[float]], x0: float, x1: float) -> float:
    i, wi, si = _locate(g0, x0)
    j, wj, sj = _locate(g1, x1)
    r0, r1 = vals[i], vals[i + 1]
    a = r0[j] + wj * (r0[j + 1] - r0[j])
    b = r1[j] + wj * (r1[j + 1] - r1[j])
    return (a + wi * (b - a)) * si * sj


def _interp3(g0, g1, g2, vals, x0: float, x1: float, x2: float) -> float:
    i, wi, si = _locate(g0, x0)
    j, wj, sj = _locate(g1, x1)
    k, wk, sk = _locate(g2, x2)
    out = []
    for plane in (vals[i], vals[i + 1]):
        r0, r1 = plane[j], plane[j + 1]
        a = r0[k] + wk * (r0[k + 1] - r0[k])
        b = r1[k] + wk * (r1[k + 1] - r1[k])
        out.append(a + wj * (b - a))
    return (out[0] + wi * (out[1] - out[0])) * si * sj * sk


@contextlib.contextmanager
def _quiet(logger_name: str):
    # Loading the perf database warns about MLA/DSA fallback tables no dense model uses.
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _import_aiconfigurator():
    try:
        from aiconfigurator_core.sdk import perf_database
        from aiconfigurator_core.sdk.engine import EngineHandle
    except ImportError as exc:
        raise CostModelError(
            "the aiconfigurator cost model needs aiconfigurator-core, which the `sim` extra installs: "
            f"pip install 'pars-fast[sim]' (aiconfigurator-core=={AICONFIGURATOR_VERSION}); or use kind 'linear'"
        ) from exc
    return EngineHandle, perf_database


# Largest context aiconfigurator is asked about (Llama-3.1's 128k window); longer is clamped.
_MAX_CONTEXT = 131072


class _AICTables:
    """aiconfigurator's step terms for one (model, GPU, TP), sampled on grids (milliseconds)."""

    def __init__(self, model: ModelSpec, gpu: GPUSpec, tp: int) -> None:
        import numpy as np

        EngineHandle, perf_database = _import_aiconfigurator()
        with _quiet("aiconfigurator_core"):
            try:
                self.package_version = importlib.metadata.version("aiconfigurator-core")
                self.data_version = perf_database.resolve_query_version(gpu.name, "vllm", "current")
                eng = EngineHandle.compile(model.name, gpu.name, "vllm", tp_size=tp)
            except Exception as exc:  # aiconfigurator raises many types for a missing table or system
                raise CostModelError(
                    f"aiconfigurator cannot model {model.name} on {gpu.name} tp={tp} with vLLM tables: {exc}"
                ) from exc
        self.engine = eng
        ctx_names = self._op_names(eng.evaluate_context_ops)
        gen_names = self._op_names(eng.evaluate_generation_ops)
        wanted = {"context_attention", "context_logits_gemm"} - set(ctx_names)
        wanted |= {"generation_attention"} - set(gen_names)
        if wanted:  # not a dense decoder as aiconfigurator builds Llama/Qwen3
            raise CostModelError(f"aiconfigurator's {model.name} has no {', '.join(sorted(wanted))} op")
        self.ctx_attn = ctx_names.index("context_attention")
        self.logits = ctx_names.index("context_logits_gemm")
        self.gen_attn = gen_names.index("generation_attention")
        self.shared = [i for i in range(len(ctx_names)) if i not in (self.ctx_attn, self.logits)]

        # Non-attention ops at T tokens; logits at R rows.
        self.t_grid = _grid(512, 64, 1 << 17)
        self.t_vals = self._monotone(np.array([self.shared_ms(t) for t in self.t_grid]))
        self.r_grid = _grid(512, 32, 1 << 14)
        self.r_vals = self._monotone(np.array([self.logits_ms(r) for r in self.r_grid]))

        # Decode attention at (requests, mean context); prefill attention at (chunks, new
        # tokens per chunk, cached prefix). 4 and 2 nodes per octave: denser grids cost
        # seconds (a query takes aiconfigurator up to 0.6 ms) and gain < 0.1% at the median.
        self.d_grid = _grid(8, 4, 4096)
        self.c_grid = _grid(16, 4, _MAX_CONTEXT)
        self.dec_vals = self._monotone(
            np.array([[self.decode_attention_ms(d, c) for c in self.c_grid] for d in self.d_grid])
        )
        self.b_grid = _grid(1, 1, 1024)
        self.n_grid = _grid(4, 2, 1 << 17)
        self.p_grid = [0, *_grid(1, 2, _MAX_CONTEXT)]
        self.pre_vals = self._monotone(
            np.array(
                [[[self.prefill_attention_ms(b, n, p) for p in self.p_grid] for n in self.n_grid] for b in self.b_grid]
            )
        )

    @staticmethod
    def _op_names(evaluate) -> list[str]:
        names = []
        while True:
            try:
                names.append(evaluate([len(names)], batch_size=1, s=16)[0][0])
            except ValueError:  # "index N out of range": the op list ended
                return names

    @staticmethod
    def _monotone(arr) -> list:
        """The grid nearest ``arr`` (least squares on log values: relative error) that never
        falls as any input grows: isotonic regression along each axis in turn. It is an
        order-preserving map, so each pass keeps the previous axes monotone, and it keeps
        every node above any monotone lower bound the raw values respect (the HBM floor)."""
        import numpy as np
        from scipy.optimize import isotonic_regression

        out = np.log(arr)
        for axis in range(out.ndim):
            out = np.apply_along_axis(lambda v: isotonic_regression(v).x, axis, out)
        return np.exp(out).tolist()

    @staticmethod
    def chunk_shape(chunks: int, new_tokens: int, work: float) -> tuple[float, float]:
        """The uniform batch that stands for ``chunks`` prefill chunks: each with the mean
        ``new_tokens/chunks`` new tokens, and the cached prefix that gives the batch the same
        attention work (query-key pairs, ``work = sum n*(k + (n+1)/2)``). For one chunk, or
        equal ones, that is exactly their own prefix. Returns (new, prefix)."""
        new = max(1.0, new_tokens / chunks)
        prefix = work / (new * chunks) - (new + 1) / 2
        return new, min(max(0.0, prefix), float(_MAX_CONTEXT))

    # Direct queries (milliseconds), used to fill the grids and by the tests.
    def shared_ms(self, tokens: int) -> float:
        return sum(op[1] for op in self.engine.evaluate_context_ops(self.shared, batch_size=1, s=int(tokens)))

    def logits_ms(self, rows: int) -> float:
        return self.engine.evaluate_context_ops([self.logits], batch_size=int(rows), s=1)[0][1]

    def decode_attention_ms(self, requests: int, context: int) -> float:
        return self.engine.evaluate_generation_ops([self.gen_attn], batch_size=int(requests), s=int(context))[0][1]

    def prefill_attention_ms(self, chunks: int, new: int, prefix: int) -> float:
        ops = self.engine.evaluate_context_ops([self.ctx_attn], batch_size=int(chunks), s=int(new), prefix=int(prefix))
        return ops[0][1]


@functools.lru_cache(maxsize=8)
def _aic_tables(model: str, gpu: str, tp: int) -> _AICTables:
    return _AICTables(model_spec(model), gpu_spec(gpu), tp)


class AIConfiguratorCost:
    """Step cost from aiconfigurator-core's vLLM kernel tables plus a per-step overhead
    (composition, representative contexts, grids: module docstring)."""

    def __init__(self, *, model: str, gpu: str, tp: int = 1, overhead_s: float | None = None) -> None:
        self.model = model_spec(model)
        self.gpu = gpu_spec(gpu)
        self.model.check_tp(tp)
        self.tp = tp
        self.overhead_s = DEFAULT_OVERHEAD_S if overhead_s is None else float(overhead_s)
        if not (math.isfinite(self.overhead_s) and self.overhead_s >= 0):
            raise CostModelError(f"overhead_s must be a finite number >= 0, got {overhead_s!r}")
        self._t = _aic_tables(self.model.name, self.gpu.name, tp)
        self.name = f"aiconfigurator:{self.model.name}@{self.gpu.name}/tp{tp}"
        self.description = (
            f"aiconfigurator-core {self._t.package_version}, vLLM {self._t.data_version} kernel tables "
            f"({self.gpu.name}, tp={tp}): forward pass + {self.overhead_s * 1e3:.2f} ms/step overhead; "
            "decode attention at the batch's mean context, prefill chunks as one equal-work batch"
        )

    def forward_s(self, batch: StepBatch) -> float:
        """Seconds of the forward pass alone (no overhead)."""
        t = self._t
        chunks = len(batch.prefill_chunks)
        q = w2 = 0
        for n, k in batch.prefill_chunks:
            q += n
            w2 += n * (2 * k + n + 1)  # twice the query-key pairs, kept in integers
        d = len(batch.decode_contexts)
        if q + d == 0:
            return 0.0
        ms = _interp1(t.t_grid, t.t_vals, q + d) + _interp1(t.r_grid, t.r_vals, chunks + d)
        if q:
            new, prefix = t.chunk_shape(chunks, q, w2 / 2)
            ms += _interp3(t.b_grid, t.n_grid, t.p_grid, t.pre_vals, chunks, new, prefix)
        if d:
            ms += _interp2(t.d_grid, t.c_grid, t.dec_vals, d, sum(batch.decode_contexts) / d)
        return ms * 1e-3

    def step_s(self, batch: StepBatch) -> float:
        """Seconds of one engine step: the forward pass plus the per-step overhead."""
        return self.overhead_s + self.forward_s(batch)

    def direct_forward_s(self, batch: StepBatch) -> float:
        """The same composition asked of aiconfigurator directly (no grid, no monotone
        envelope): slow, for checking the grid."""
        t = self._t
        chunks, ctxs = batch.prefill_chunks, batch.decode_contexts
        tokens = batch.prefill_tokens + len(ctxs)
        if tokens == 0:
            return 0.0
        ms = t.shared_ms(tokens) + t.logits_ms(batch.num_reqs)
        if chunks:
            q = batch.prefill_tokens
            w = sum(n * (k + (n + 1) / 2) for n, k in chunks)
            new, prefix = t.chunk_shape(len(chunks), q, w)
            ms += t.prefill_attention_ms(len(chunks), round(new), round(prefix))
        if ctxs:
            ms += t.decode_attention_ms(len(ctxs), min(max(1, round(sum(ctxs) / len(ctxs))), _MAX_CONTEXT))
        return ms * 1e-3


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def build_cost_model(
    kind: str,
    *,
    model: str,
    gpu: str,
    tp: int = 1,
    file: str | Path | None = None,
    overhead_s: float | None = None,
) -> StepCost:
    """A step cost model.

    ``kind="aiconfigurator"``: aiconfigurator-core's tables (the ``sim`` extra) plus
    ``overhead_s`` per step (default ``DEFAULT_OVERHEAD_S``). ``kind="linear"``: the
    coefficients in ``file``, or the shipped preset for (model, gpu, tp); ``overhead_s``
    then replaces the overhead the coefficients record in ``"overhead_s"`` (presets do).
    """
    kind = kind.strip().lower()
    if kind == "aiconfigurator":
        if file is not None:
            raise CostModelError("kind 'aiconfigurator' reads no coefficients file; file= is for kind 'linear'")
        return AIConfiguratorCost(model=model, gpu=gpu, tp=tp, overhead_s=overhead_s)
    if kind != "linear":
        raise CostModelError(f"unknown cost model kind {kind!r}; choose from {', '.join(KINDS)}")
    if file is None:
        cost = linear_preset(model=model, gpu=gpu, tp=tp)
    else:
        cost = LinearCost.from_file(file)
        _check_same_deployment(cost, model=model, gpu=gpu, tp=tp, where=str(file))
    if overhead_s is None:
        return cost
    if "overhead_s" not in cost.metadata:
        raise CostModelError(
            f"{cost.name}: its beta0_s does not say how much of it is per-step overhead (no \"overhead_s\"), "
            "so overhead_s cannot replace it; edit beta0_s instead"
        )
    beta0 = cost.beta0_s - float(cost.metadata["overhead_s"]) + float(overhead_s)
    meta = {**cost.metadata, "overhead_s": float(overhead_s)}
    return LinearCost(beta0, cost.prefill_s_per_token, cost.decode_s_per_token, cost.context_s_per_token,
                      cost.source, meta)


def _check_same_deployment(cost: LinearCost, *, model: str, gpu: str, tp: int, where: str) -> None:
    """Refuse a coefficients file that records another model, GPU or TP than asked for."""
    normalize = {
        "model": lambda v: _model_key(str(v)),
        "gpu": lambda v: _GPU_ALIASES.get(_gpu_key(str(v)), _gpu_key(str(v))),
        "tp": int,
    }
    for key, want in (("model", model), ("gpu", gpu), ("tp", tp)):
        if key in cost.metadata and normalize[key](cost.metadata[key]) != normalize[key](want):
            raise CostModelError(f"{where} was fitted for {key}={cost.metadata[key]!r}, not {want!r}")
