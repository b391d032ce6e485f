"""The PARS ranker: a BERT-family encoder, pooling, and a score head.

``Ranker.score(prompts)`` returns one float32 per prompt; a higher score means a
longer expected response, so a scheduler serves prompts in ascending score order.
The encoder reads the prompt truncated to ``config.max_prompt_tokens`` tokens
(PARS uses 128).

The head (:mod:`pars_fast.heads`) is PARS's ``Linear(hidden, 1)`` on the pooled
embedding, or an MLP, optionally fused with cheap features of the prompt's
whole text (:mod:`pars_fast.features`) and blended with a kNN memory of the
training prompts. ``Ranker.head_spec`` says which.

A saved ranker is a self-contained folder (format version 2; version-1 folders,
which are plain-linear ones without ``"head"`` in ``ranker.json``, still load)::

    ranker.json         format version, RankerConfig, and the head spec ("head")
    encoder/            the encoder (HF ``save_pretrained``: config.json, model.safetensors)
    head.safetensors    plain linear head: weight [1, hidden], bias [1] (as in version 1);
                        any other head: the ScoreHead tensors (net.*, standardization buffers)
    memory.safetensors  kNN heads only: keys [m, hidden] (fp16, unit rows), values [m] (log1p length)
    tokenizer/          the tokenizer (HF ``save_pretrained``)
    metadata.json       how it was trained: data, recipe, loss, mode, metrics, pars_fast version

The forward pass runs in an encoder *backend* (:mod:`pars_fast.backends`). A
plain linear head is scored by the backend itself (the Triton path fuses it);
other heads run in torch on the backend's ``pooled()`` output. A Triton backend on
CUDA is checked against the torch path on a probe batch before it serves
(:mod:`pars_fast.backend_check`); the verdict is ``Ranker.backend_check``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pars_fast.backend_check import check_backend, needs_check
from pars_fast.backends import POOLINGS, EncoderBackend, check_batch, make_backend
from pars_fast.data import clean_text
from pars_fast.heads import HeadSpec, ScoreHead

FORMAT = "pars_fast.ranker"
FORMAT_VERSION = 2
TRUNCATIONS = ("head", "head_tail")

# Long prompts are cut (at whitespace) to this many characters per needed token
# before tokenizing: a 1 MB prompt then costs microseconds instead of seconds.
# WordPiece/BPE tokens average ~4-5 characters; 32 leaves a wide margin, and a
# too-short cut is detected and re-done on the full text.
_CHARS_PER_TOKEN_CAP = 32
_WHITESPACE = (" ", "\n", "\t", "\r")


class RankerLoadError(RuntimeError):
    """A ranker folder that is missing files or cannot be read."""


class RankerNotFoundError(RankerLoadError, FileNotFoundError):
    """No ranker at the given path."""


@dataclass
class RankerConfig:
    """How prompts become encoder inputs and how the encoder output is pooled."""

    max_prompt_tokens: int = 128  # including special tokens ([CLS], [SEP]); PARS uses 128
    pooling: str = "mean"  # "mean" (masked mean) or "cls"; see docs/RANKING.md for the choice
    truncation: str = "head"  # "head": first tokens; "head_tail": first and last tokens
    head_tokens: int | None = None  # head_tail only: tokens kept from the start (default: half)

    def validate(self) -> RankerConfig:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 3:
            raise ValueError(f"max_prompt_tokens must be an int >= 3, got {self.max_prompt_tokens!r}")
        if self.head_tokens is not None and not 0 <= self.head_tokens <= self.max_prompt_tokens:
            raise ValueError(f"head_tokens must be in [0, max_prompt_tokens], got {self.head_tokens}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ranker config keys: {sorted(unknown)}")
        return cls(**d).validate()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT)."""
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    raise ValueError(f"cannot find the special-token template of tokenizer {type(tokenizer).__name__}")


def _missing_message(path: Path, missing: list[str], is_default: bool) -> str:
    msg = f"no usable ranker at {path}: missing {', '.join(missing)}"
    if is_default:
        msg += (
            ". Create the default ranker with `pars-fast train` (head mode, a few minutes on 2 CPU cores) "
            "or `pars_fast.training.ensure_default_ranker()`"
        )
    return msg


class Ranker:
    """Scores prompts: higher = longer expected response.

    Attributes: ``encoder`` (transformers model), ``head_spec`` (:class:`~pars_fast.heads.HeadSpec`),
    ``head`` (``torch.nn.Linear``: the head the backend scores with; the real
    head when ``head_spec.is_plain_linear``), ``score_head`` (the
    :class:`~pars_fast.heads.ScoreHead` of any other head, else ``None``),
    ``tokenizer``, ``config`` (:class:`RankerConfig`), ``metadata`` (dict),
    ``device``, ``backend`` (the :class:`~pars_fast.backends.EncoderBackend`),
    ``backend_check`` (the Triton self-check's verdict, a dict, or ``None`` when no check
    ran: :func:`pars_fast.backend_check.check_backend`).

    ``check``: run that self-check when the backend is set; ``None`` (default) checks
    exactly when the backend resolves to ``"triton"`` on a CUDA device.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        head: torch.nn.Linear | ScoreHead,
        tokenizer: Any,
        config: RankerConfig | None = None,
        metadata: dict[str, Any] | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        check: bool | None = None,
    ) -> None:
        self.config = (config or RankerConfig()).validate()
        hidden = int(encoder.config.hidden_size)
        self.device = torch.device(device) if device is not None else _default_device()
        self.encoder = encoder.to(self.device).eval()
        self._set_head_objects(head, hidden)
        self.tokenizer = tokenizer
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._prefix_ids, self._suffix_ids = _special_template(tokenizer)
        self._n_special = len(self._prefix_ids) + len(self._suffix_ids)
        max_pos = int(getattr(encoder.config, "max_position_embeddings", 512))
        # RoBERTa-style models offset position ids past the padding index.
        reserved = 2 if getattr(encoder.config, "model_type", "") in ("roberta", "xlm-roberta") else 0
        self.max_input_tokens = max_pos - reserved
        if self.config.max_prompt_tokens > self.max_input_tokens:
            raise ValueError(
                f"max_prompt_tokens={self.config.max_prompt_tokens} exceeds the encoder's "
                f"{self.max_input_tokens} positions"
            )
        if self.config.max_prompt_tokens <= self._n_special:
            raise ValueError(f"max_prompt_tokens must exceed the {self._n_special} special tokens")
        self.vocab_size = int(encoder.config.vocab_size)
        self.backend_check: dict[str, Any] | None = None
        self.set_backend(backend, check=check)

    def _set_head_objects(self, head: torch.nn.Linear | ScoreHead, hidden: int) -> None:
        if isinstance(head, ScoreHead):
            if head.hidden != hidden:
                raise ValueError(f"head reads {head.hidden}-dim embeddings, the encoder gives {hidden}")
            spec = head.spec
            if spec.is_plain_linear:
                head = head.as_linear()
        elif isinstance(head, torch.nn.Linear):
            spec = HeadSpec("linear")
        else:
            raise ValueError(f"head must be torch.nn.Linear({hidden}, 1) or a ScoreHead, got {head!r}")
        self.head_spec: HeadSpec = spec
        if isinstance(head, torch.nn.Linear):
            if head.in_features != hidden or head.out_features != 1:
                raise ValueError(f"head must be torch.nn.Linear({hidden}, 1), got {head!r}")
            self.head = head.to(self.device).eval()
            self.score_head: ScoreHead | None = None
        else:
            self.score_head = head.to(self.device).eval()
            # The backend still wants a Linear; with this head it is never used to score.
            self.head = torch.nn.Linear(hidden, 1).to(self.device).eval()
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()

    def set_head(self, head: torch.nn.Linear | ScoreHead) -> None:
        """Replace the score head (and rebuild the backend around it, keeping its self-check verdict)."""
        self._set_head_objects(head, self.hidden_size)
        self._rebuild_backend()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike[str] | None = None,
        config: RankerConfig | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        seed: int = 42,
    ) -> Ranker:
        """A new ranker on a local HF BERT-family folder (default: all-MiniLM-L6-v2), untrained head.

        ``backbone`` may also be a saved ranker folder (a fine-tuned encoder): its
        encoder and tokenizer are reused, and its head too when that is a plain
        ``Linear`` (``metadata["backbone_head"]`` says so), so a new head can be
        fitted on a fine-tuned encoder without fine-tuning again.
        """
        from transformers import AutoModel, AutoTokenizer

        if backbone is None:
            from pars_fast.tiny_llama import minilm_dir

            backbone = minilm_dir()
        path = Path(backbone)
        if (path / "ranker.json").is_file():
            base = cls.load(path, backend="hf", device="cpu")
            head = base.head if base.score_head is None else torch.nn.Linear(base.hidden_size, 1)
            meta = {"backbone": str(path), "backbone_head": base.score_head is None}
            return cls(base.encoder, head, base.tokenizer, config or base.config, metadata=meta, backend=backend,
                       device=device)
        if not (path / "config.json").is_file():
            raise RankerNotFoundError(f"backbone folder {path} has no config.json (need a local HF model folder)")
        encoder = AutoModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        torch.manual_seed(seed)
        head = torch.nn.Linear(int(encoder.config.hidden_size), 1)
        meta = {"backbone": str(path)}
        return cls(encoder, head, tokenizer, config, metadata=meta, backend=backend, device=device)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        check: bool | None = None,
    ) -> Ranker:
        """Load a saved ranker; ``None`` loads the default one at ``default_ranker_dir()``.

        ``check``: the backend self-check (see :class:`Ranker`; default: Triton on CUDA only).
        """
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from pars_fast.paths import default_ranker_dir

        is_default = path is None
        folder = Path(default_ranker_dir() if path is None else path).expanduser()
        if not folder.is_dir():
            raise RankerNotFoundError(_missing_message(folder, ["the folder itself"], is_default))
        needed = ["ranker.json", "encoder/config.json", "head.safetensors", "tokenizer"]
        missing = [n for n in needed if not (folder / n).exists()]
        if (folder / "encoder").is_dir() and not any((folder / "encoder").glob("*.safetensors")):
            missing.append("encoder/*.safetensors")
        if missing:
            raise RankerNotFoundError(_missing_message(folder, missing, is_default))
        try:
            info = json.loads((folder / "ranker.json").read_text())
            if info.get("format") != FORMAT:
                raise ValueError(f"ranker.json format is {info.get('format')!r}, expected {FORMAT!r}")
            if int(info.get("format_version", -1)) > FORMAT_VERSION:
                raise ValueError(f"format_version {info['format_version']} is newer than this pars_fast reads")
            config = RankerConfig.from_dict(info["config"])
            spec = HeadSpec.from_dict(info["head"]) if "head" in info else HeadSpec("linear")  # version 1: linear
            encoder = AutoModel.from_pretrained(str(folder / "encoder"))
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
            state = load_file(str(folder / "head.safetensors"))
            hidden = int(encoder.config.hidden_size)
            head: torch.nn.Linear | ScoreHead
            if spec.is_plain_linear:
                shapes = {k: tuple(v.shape) for k, v in state.items()}
                if shapes != {"weight": (1, hidden), "bias": (1,)}:
                    raise ValueError(f"head.safetensors must hold weight [1, {hidden}] and bias [1]; got {shapes}")
                head = torch.nn.Linear(hidden, 1)
                head.load_state_dict(state)
            else:
                mem_file = folder / "memory.safetensors"
                memory = load_file(str(mem_file)) if mem_file.is_file() else None
                head = ScoreHead.from_tensors(hidden, spec, state, memory)
            meta_file = folder / "metadata.json"
            metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        except RankerLoadError:
            raise
        except Exception as exc:  # any parse/shape/IO problem: say which folder and why
            raise RankerLoadError(f"corrupt ranker at {folder}: {type(exc).__name__}: {exc}") from exc
        return cls(encoder, head, tokenizer, config, metadata=metadata, backend=backend, device=device, check=check)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a self-contained ranker folder (atomically: a temp folder renamed into place)."""
        from safetensors.torch import save_file

        from pars_fast import __version__

        folder = Path(path).expanduser()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "head": self.head_spec.to_dict(),
        }
        (tmp / "ranker.json").write_text(json.dumps(info, indent=2) + "\n")
        self.encoder.save_pretrained(str(tmp / "encoder"))
        if self.score_head is None:
            state = {k: v.detach().cpu().contiguous().float() for k, v in self.head.state_dict().items()}
            save_file(state, str(tmp / "head.safetensors"))
        else:
            state, memory = self.score_head.tensors()
            save_file(state, str(tmp / "head.safetensors"))
            if memory is not None:
                save_file(memory, str(tmp / "memory.safetensors"))
        self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"pars_fast_version": __version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.metadata}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
        return folder

    # ------------------------------------------------------------------ backend

    def set_backend(self, name: str = "auto", check: bool | None = None) -> None:
        """Switch the encoder backend (``"auto"``, ``"hf"``, or any registered name).

        ``check`` (``None``: only Triton on CUDA) scores a probe batch with it and with
        the torch path first, and keeps the torch path if they disagree.
        """
        self.backend: EncoderBackend = make_backend(name, self.encoder, self.head, self.config.pooling, self.device)
        self.backend_name: str = self.backend.name
        self.backend_check = None
        if needs_check(self.backend_name, self.device) if check is None else check:
            check_backend(self)

    def _rebuild_backend(self) -> None:
        """The same backend around a new head or device. A backend the self-check refused
        stays refused (its name is no longer ``backend_name``), and the verdict is kept."""
        self.backend = make_backend(self.backend_name, self.encoder, self.head, self.config.pooling, self.device)

    def to(self, device: torch.device | str) -> Ranker:
        self.device = torch.device(device)
        self.encoder.to(self.device)
        self.head.to(self.device)
        if self.score_head is not None:
            self.score_head.to(self.device)
        self._rebuild_backend()
        return self

    # ------------------------------------------------------------------ tokenizing

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it: [prompt]")
        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, expected str")
            out.append(clean_text(p))
        return out

    def _split_budget(self) -> tuple[int, int]:
        """(tokens kept from the start, tokens kept from the end) of a prompt body."""
        budget = self.config.max_prompt_tokens - self._n_special
        if self.config.truncation == "head":
            return budget, 0
        head = budget // 2 if self.config.head_tokens is None else min(self.config.head_tokens, budget)
        return head, budget - head

    def _body_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Encoder inputs of each prompt: special tokens + the truncated body (``config``)."""
        texts = self._check_prompts(prompts)
        head_n, tail_n = self._split_budget()
        budget = head_n + tail_n
        cap = _CHARS_PER_TOKEN_CAP * max(head_n, tail_n, 1) + 1024
        # Split each text into pieces to tokenize in one batched call: the whole
        # text, or, for very long texts, a whitespace-aligned head (and tail) cut.
        pieces: list[str] = []
        plan: list[tuple[int, int, int]] = []  # (kind, first piece, n pieces); kind 0 = whole, 1 = cut
        for text in texts:
            if len(text) <= 2 * cap:
                plan.append((0, len(pieces), 1))
                pieces.append(text)
                continue
            h_cut = max(text.rfind(c, 0, cap) for c in _WHITESPACE)
            t_cut = [i for i in (text.find(c, len(text) - cap) for c in _WHITESPACE) if i >= 0]
            t_start = min(t_cut) if t_cut else -1
            if h_cut <= 0 or (tail_n and t_start < 0):
                plan.append((0, len(pieces), 1))  # no safe cut point: tokenize it all
                pieces.append(text)
                continue
            plan.append((1, len(pieces), 2 if tail_n else 1))
            pieces.append(text[:h_cut])
            if tail_n:
                pieces.append(text[t_start:])
        ids = self._body_ids(pieces) if pieces else []
        out: list[list[int]] = []
        for text, (kind, first, _) in zip(texts, plan):
            if kind == 0:
                body = ids[first]
                if len(body) > budget:
                    body = body[:head_n] + (body[len(body) - tail_n :] if tail_n else [])
            else:
                head_ids = ids[first]
                tail_ids = ids[first + 1] if tail_n else []
                if len(head_ids) < head_n or len(tail_ids) < tail_n:
                    body = self._body_ids([text])[0]  # the cut was too short (rare): exact path
                    if len(body) > budget:
                        body = body[:head_n] + (body[len(body) - tail_n :] if tail_n else [])
                else:
                    body = head_ids[:head_n] + (tail_ids[len(tail_ids) - tail_n :] if tail_n else [])
            out.append(self._prefix_ids + list(body) + self._suffix_ids)
        return out

    # ------------------------------------------------------------------ scoring

    def _head_scores(self, pooled: torch.Tensor, texts: Sequence[str] | None, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of pooled embeddings under a non-plain head (cheap features from ``texts``, else decoded ids)."""
        assert self.score_head is not None
        feats = None
        if self.score_head.n_features:
            from pars_fast.features import cheap_features

            if texts is None:
                # Only token ids: the features see the decoded (truncated, lower-cased) prompt.
                texts = self.tokenizer.batch_decode([list(ids) for ids in batch], skip_special_tokens=True)
            feats = torch.from_numpy(cheap_features(texts)).to(pooled.device)
        return self.score_head(pooled.float(), feats)

    def _run(
        self, batch: list[list[int]], texts: Sequence[str] | None, embed: bool, backend: EncoderBackend | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if not batch:
            return np.empty(0, dtype=np.float32), np.empty((0, self.hidden_size), dtype=np.float32) if embed else None
        check_batch(batch, self.vocab_size, self.max_input_tokens)
        backend = self.backend if backend is None else backend
        with torch.inference_mode():
            if self.score_head is None and not embed:
                scores = backend.score(batch)
                pooled = None
            else:
                pooled = backend.pooled(batch).float()
                scores = self.head(pooled).squeeze(-1) if self.score_head is None else self._head_scores(pooled, texts, batch)
            out = scores.detach().float().cpu().numpy().astype(np.float32, copy=False)
            emb = pooled.cpu().numpy().astype(np.float32, copy=False) if pooled is not None and embed else None
        return out, emb

    def score_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores of token-id lists as produced by :meth:`tokenize` (float32, input order).

        A head that fuses cheap prompt features reads them from the decoded ids
        here; :meth:`score` reads them from the whole prompt text instead.
        """
        return self._run([list(map(int, ids)) for ids in batch], None, embed=False)[0]

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """Score prompts in one batched call: float32 array, higher = longer expected response."""
        texts = self._check_prompts(prompts)
        return self._run(self.tokenize(texts), texts, embed=False)[0]

    def score_with_backend(self, backend: EncoderBackend, prompts: Sequence[str]) -> np.ndarray:
        """:meth:`score` through another backend built around this ranker's encoder and head
        (the backend self-check compares two on the same prompts)."""
        texts = self._check_prompts(prompts)
        return self._run(self.tokenize(texts), texts, embed=False, backend=backend)[0]

    def score_and_embed(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n] float32, pooled embeddings [n, hidden] float32)`` from one encoder pass.

        The embeddings are exactly what the head (and a kNN memory) read.
        """
        texts = self._check_prompts(prompts)
        scores, emb = self._run(self.tokenize(texts), texts, embed=True)
        assert emb is not None
        return scores, emb

    def pooled(self, prompts: Sequence[str]) -> np.ndarray:
        """Pooled encoder features (float32 [n, hidden]) of prompts."""
        batch = self.tokenize(prompts)
        if not batch:
            return np.empty((0, self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            return self.backend.pooled(batch).float().cpu().numpy()

    def __repr__(self) -> str:
        return (
            f"Ranker({type(self.encoder).__name__}, hidden={self.hidden_size}, {self.config}, head={self.head_spec.kind}"
            f"{'+features' if self.head_spec.features else ''}{'+knn' if self.head_spec.knn else ''}, "
            f"backend={self.backend_name!r}, device={str(self.device)!r})"
        )


__all__ = ["FORMAT", "FORMAT_VERSION", "Ranker", "RankerConfig", "RankerLoadError", "RankerNotFoundError"]
