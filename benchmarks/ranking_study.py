"""Ranking study: every head variant on one encoder's embeddings, same split, same metrics.

    PARS_FAST_HOME=DIR python benchmarks/ranking_study.py [--ranker DIR] --out docs/ranking/NAME.json

Without ``--ranker`` the encoder is the frozen all-MiniLM-L6-v2. With a
fine-tuned ranker folder, its encoder's embeddings are used, and its own head is
one more variant. Embeddings come from the feature cache (``FeatureCache``,
keyed by the encoder weights), so a second run on the same encoder costs seconds.

Data (see docs/RANKING.md): ShareGPT first turns, 90/10 seed-42 split; the
training part loses its seeded 5% validation slice (the same slice
``pars-fast train`` uses). Evaluation: the test split, the later-turn set
(``sharegpt-later``) and HumanEval, none of them seen by any fit here.
Metrics: Kendall τ ± bootstrap SE (200 resamples of prompts), δ=0.2 pairwise accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pars_fast.data import load_humaneval, sharegpt_later, sharegpt_split
from pars_fast.evaluation import prompt_length_scores
from pars_fast.features import FEATURE_NAMES, cheap_features
from pars_fast.heads import HeadSpec, KnnSpec, attach_knn, fit_head
from pars_fast.losses import compute_loss
from pars_fast.metrics import bootstrap_se, kendall_tau, pairwise_accuracy
from pars_fast.ranker import Ranker
from pars_fast.training import encode_features, split_validation

SETS = ("test", "later", "humaneval")


def metrics(scores: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    return {
        "tau": round(kendall_tau(scores, lengths), 4),
        "tau_se": round(bootstrap_se(scores, lengths), 4),
        "acc": round(pairwise_accuracy(scores, lengths, 0.2), 4),
    }


def truncated_view(ranker: Ranker, prompts: list[str], slack: float = 1.25) -> list[str]:
    """What the scheduler hands the ranker: the prompt's first ~1.25 x max_prompt_tokens tokens, decoded."""
    n = math.ceil(ranker.config.max_prompt_tokens * slack)
    ids = ranker.tokenizer([p for p in prompts], add_special_tokens=False, verbose=False)["input_ids"]
    return ranker.tokenizer.batch_decode([x[:n] for x in ids], skip_special_tokens=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranker", default=None, help="ranker folder whose encoder to use (default: frozen MiniLM)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the slower variants (GBT, OOF stacking)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    train_all, test = sharegpt_split()
    train, val = split_validation(train_all)
    data = {"train": train, "val": val, "test": test, "later": sharegpt_later(), "humaneval": load_humaneval()}
    lengths = {k: np.array([s.response_len for s in v], dtype=np.float64) for k, v in data.items()}
    prompts = {k: [s.prompt for s in v] for k, v in data.items()}

    if args.ranker:
        ranker = Ranker.load(args.ranker, backend="hf", device="cpu")
    else:
        ranker = Ranker.from_backbone(backend="hf", device="cpu")
    t0 = time.perf_counter()
    emb = {k: encode_features(ranker, ranker.tokenize(p), desc=f"encoding {k}") for k, p in prompts.items()}
    t_emb = time.perf_counter() - t0
    feats = {k: torch.from_numpy(cheap_features(p)) for k, p in prompts.items()}
    feats_trunc = {k: torch.from_numpy(cheap_features(truncated_view(ranker, p))) for k, p in prompts.items()}
    lt = {k: torch.tensor(v, dtype=torch.float32) for k, v in lengths.items()}
    log_len = torch.log1p(lt["train"])
    loss_kw = {"delta": 0.2, "margin": 1.0, "log_mean": float(log_len.mean()), "log_std": float(log_len.std())}

    def loss_of(name):
        return lambda s, y, g: compute_loss(name, s, y, generator=g, **loss_kw)

    def val_acc(scores, ys):
        v = pairwise_accuracy(scores, ys, 0.2)
        return -1.0 if math.isnan(v) else v

    results: dict[str, dict] = {}

    def record(name: str, score_fn, note: str = "") -> None:
        row = {k: metrics(score_fn(k), lengths[k]) for k in ("val", *SETS)}
        row["note"] = note
        results[name] = row
        t = row["test"]
        print(
            f"{name:<44} val {row['val']['tau']:.3f} | test {t['tau']:.3f}±{t['tau_se']:.3f} acc {t['acc']:.3f} | "
            f"later {row['later']['tau']:.3f} | he {row['humaneval']['tau']:.3f}",
            flush=True,
        )

    # ---- baselines
    record("prompt length (tokens)", lambda k: prompt_length_scores(prompts[k], ranker.tokenizer))
    for name, fi in (("log chars", 0),):
        record(f"cheap feature: {name}", lambda k, fi=fi: feats[k][:, fi].numpy())

    def head_scores(head, k, use_feats=None):
        f = (use_feats or feats)[k] if head.n_features else None
        with torch.no_grad():
            return head(emb[k], f).numpy()

    if args.ranker:
        own = ranker.head

        def own_scores(k):
            with torch.no_grad():
                return own(emb[k]).squeeze(-1).numpy()

        record("own head (as trained)", own_scores)

    fitted = {}
    for loss in ("pairwise", "pointwise", "listmle"):
        for spec_name, spec in (
            ("linear", HeadSpec("linear")),
            ("mlp256", HeadSpec("mlp", units=256)),
            ("linear+features", HeadSpec("linear", features=True, feature_names=list(FEATURE_NAMES))),
            ("mlp256+features", HeadSpec("mlp", units=256, features=True, feature_names=list(FEATURE_NAMES))),
        ):
            if loss != "pairwise" and spec_name != "linear":
                continue
            t0 = time.perf_counter()
            fit = fit_head(
                spec, emb["train"], lt["train"], loss_of(loss), feats=feats["train"] if spec.features else None,
                val=(emb["val"], feats["val"] if spec.features else None, lengths["val"]), val_metric=val_acc,
                dropout=0.1 if spec.kind == "mlp" else 0.0,
            )
            dt = time.perf_counter() - t0
            fitted[(loss, spec_name)] = fit.head
            record(f"{spec_name} / {loss}", lambda k, h=fit.head: head_scores(h, k), f"fit {dt:.0f} s, best epoch {fit.best['epoch']}")
            if spec.features:
                record(f"{spec_name} / {loss} (features on the scheduler's truncated view)",
                       lambda k, h=fit.head: head_scores(h, k, feats_trunc))

    # ---- kNN: tune k and temperature on validation (memory = the training part)
    from pars_fast.heads import KnnMemory

    vals = torch.log1p(lt["train"])
    grid = {}
    for k in (10, 20, 50, 100, 200):
        for temp in (0.01, 0.02, 0.05, 0.1, 1.0):
            mem = KnnMemory(emb["train"], vals, KnnSpec(k=k, temperature=temp))
            with torch.no_grad():
                grid[(k, temp)] = val_acc(mem.lookup(emb["val"]).numpy(), lengths["val"])
    (bk, bt) = max(grid, key=grid.get)
    knn_spec = KnnSpec(k=bk, temperature=bt)
    mem = KnnMemory(emb["train"], vals, knn_spec)
    print(f"kNN grid best: k={bk} T={bt} val acc {grid[(bk, bt)]:.4f}", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(5):
            mem.lookup(emb["test"])
    knn_ms = (time.perf_counter() - t0) / 5 / len(test) * 1e3
    record(f"kNN alone (k={bk}, T={bt})", lambda k: mem.lookup(emb[k]).numpy(),
           f"memory {mem.rows} x {mem.keys.shape[1]} fp16 = {mem.keys.numel() * 2 / 1e6:.1f} MB; lookup {knn_ms:.3f} ms/prompt")

    for base in ("linear", "mlp256", "linear+features", "mlp256+features"):
        blended, info = attach_knn(fitted[("pairwise", base)], knn_spec, emb["train"], lt["train"],
                                   val=(emb["val"], feats["val"] if fitted[("pairwise", base)].n_features else None, lengths["val"]),
                                   val_metric=val_acc)
        record(f"{base} / pairwise + kNN", lambda k, h=blended: head_scores(h, k),
               f"blend weight {info['weight_relative']} x spread")
    if args.ranker:
        from pars_fast.heads import ScoreHead

        own_head = ScoreHead.from_linear(ranker.head)
        blended, info = attach_knn(own_head, knn_spec, emb["train"], lt["train"], val=(emb["val"], None, lengths["val"]),
                                   val_metric=val_acc)
        results_note = f"blend weight {info['weight_relative']} x spread"
        record("own head + kNN", lambda k, h=blended: head_scores(h, k), results_note)

    # ---- kNN lookups as head inputs (leave-one-out while fitting): the default recipe's head
    from pars_fast.heads import KNN_INPUTS

    for base in ("linear", "mlp256"):
        spec = HeadSpec("linear" if base == "linear" else "mlp", units=256, features=True,
                        feature_names=list(FEATURE_NAMES), knn=KnnSpec(k=bk, temperature=bt), knn_inputs=True)
        t0 = time.perf_counter()
        fit = fit_head(spec, emb["train"], lt["train"], loss_of("pairwise"), feats=feats["train"],
                       val=(emb["val"], feats["val"], lengths["val"]), val_metric=val_acc,
                       dropout=0.1 if spec.kind == "mlp" else 0.0,
                       memory=KnnMemory(emb["train"], vals, spec.knn))
        record(f"{base}+features+kNN inputs / pairwise", lambda k, h=fit.head: head_scores(h, k),
               f"fit {time.perf_counter() - t0:.0f} s; kNN inputs: {', '.join(KNN_INPUTS)}")

    # ---- stacking: a pairwise linear blend over [base score, kNN, cheap features], fitted on validation only
    def stack_on_val(base_fn, name):
        cols = lambda k: torch.cat([torch.from_numpy(np.asarray(base_fn(k), dtype=np.float32))[:, None],
                                    mem.lookup(emb[k])[:, None], feats[k]], 1)
        X = {k: cols(k) for k in ("val", *SETS)}
        spec = HeadSpec("linear")
        fit = fit_head(spec, X["val"], lt["val"], loss_of("pairwise"), val=None, val_metric=val_acc, epochs=60,
                       batch_size=64)
        record(name, lambda k: fit.head(X[k]).detach().numpy(), "fitted on the 499 validation prompts (test not seen)")

    if args.ranker:
        stack_on_val(lambda k: head_scores(ScoreHead.from_linear(ranker.head), k), "stack(own head, kNN, features) on val")
    stack_on_val(lambda k: head_scores(fitted[("pairwise", "mlp256")], k), "stack(mlp256, kNN, features) on val")

    # ---- gradient-boosted trees on [cheap features, out-of-fold linear score, leave-one-out kNN]
    if not args.quick:
        from sklearn.ensemble import HistGradientBoostingRegressor

        n = len(train)
        folds = np.random.default_rng(0).permutation(n) % 5
        oof = np.zeros(n, dtype=np.float32)
        for f in range(5):
            tr, te = folds != f, folds == f
            fit = fit_head(HeadSpec("linear"), emb["train"][tr], lt["train"][tr], loss_of("pairwise"),
                           val=None, val_metric=val_acc, epochs=15)
            with torch.no_grad():
                oof[te] = fit.head(emb["train"][te]).numpy()
        lin = fitted[("pairwise", "linear")]
        with torch.no_grad():
            loo = mem.lookup(emb["train"], exclude=torch.arange(n)).numpy()

        def gbt_x(k):
            if k == "train":
                return np.column_stack([feats[k].numpy(), oof, loo])
            with torch.no_grad():
                return np.column_stack([feats[k].numpy(), lin(emb[k]).numpy(), mem.lookup(emb[k]).numpy()])

        for name, cols in (("GBT(features)", slice(0, len(FEATURE_NAMES))), ("GBT(features, linear score, kNN)", slice(None))):
            t0 = time.perf_counter()
            gbt = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, max_leaf_nodes=31, random_state=0,
                                                early_stopping=True, validation_fraction=0.1)
            gbt.fit(gbt_x("train")[:, cols], np.log1p(lengths["train"]))
            dt = time.perf_counter() - t0
            record(name, lambda k, g=gbt, c=cols: g.predict(gbt_x(k)[:, c]), f"fit {dt:.0f} s")

    # ---- cost
    sample = prompts["test"][:256]
    ranker.set_backend("auto")
    torch.set_num_threads(1)
    ranker.score(sample[:8])
    t0 = time.perf_counter()
    ranker.score(sample)
    enc_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    t0 = time.perf_counter()
    cheap_features(sample)
    feat_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    torch.set_num_threads(args.threads)

    out = {
        "encoder": args.ranker or "frozen all-MiniLM-L6-v2",
        "max_prompt_tokens": ranker.config.max_prompt_tokens,
        "truncation": ranker.config.truncation,
        "n": {k: len(v) for k, v in data.items()},
        "knn": {"k": bk, "temperature": bt, "lookup_ms_per_prompt": round(knn_ms, 4), "rows": mem.rows,
                "memory_mb_fp16": round(mem.keys.numel() * 2 / 1e6, 2)},
        "cost_ms_per_prompt": {"encoder_torch_1thread": round(enc_ms, 2), "cheap_features": round(feat_ms, 4),
                               "knn_lookup": round(knn_ms, 4), "backend": ranker.backend_name},
        "embedding_pass_s": round(t_emb, 1),
        "loadavg": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
