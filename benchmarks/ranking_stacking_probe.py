"""Stacking probe on one encoder's cached embeddings: kNN at several k, GBT and linear/MLP stackers
(results: docs/ranking/frozen-stacking.txt). PARS_FAST_HOME=DIR python benchmarks/ranking_stacking_probe.py [RANKER_DIR]"""
import math, sys, time, numpy as np, torch
from pars_fast.data import load_humaneval, sharegpt_later, sharegpt_split
from pars_fast.features import FEATURE_NAMES, cheap_features
from pars_fast.heads import HeadSpec, KnnMemory, KnnSpec, fit_head
from pars_fast.losses import compute_loss
from pars_fast.metrics import bootstrap_se, kendall_tau, pairwise_accuracy
from pars_fast.ranker import Ranker
from pars_fast.training import encode_features, split_validation
torch.set_num_threads(1)
rk = sys.argv[1] if len(sys.argv) > 1 else None
tr_all, te = sharegpt_split(); tr, va = split_validation(tr_all)
D = {"train": tr, "val": va, "test": te, "later": sharegpt_later(), "he": load_humaneval()}
L = {k: np.array([s.response_len for s in v], float) for k, v in D.items()}
P = {k: [s.prompt for s in v] for k, v in D.items()}
r = Ranker.load(rk, backend="hf", device="cpu") if rk else Ranker.from_backbone(backend="hf", device="cpu")
E = {k: encode_features(r, r.tokenize(p), progress=False) for k, p in P.items()}
F = {k: torch.from_numpy(cheap_features(p)) for k, p in P.items()}
LT = {k: torch.tensor(v, dtype=torch.float32) for k, v in L.items()}
ll = torch.log1p(LT["train"]); kw = dict(delta=0.2, margin=1.0, log_mean=float(ll.mean()), log_std=float(ll.std()))
pw = lambda s, y, g: compute_loss("pairwise", s, y, generator=g, **kw)
acc = lambda s, y: pairwise_accuracy(s, y, 0.2)
def rep(name, fn):
    out = {k: fn(k) for k in ("val", "test", "later", "he")}
    print(f"{name:<50} val {kendall_tau(out['val'], L['val']):.3f} test {kendall_tau(out['test'], L['test']):.3f}±{bootstrap_se(out['test'], L['test']):.3f} "
          f"acc {acc(out['test'], L['test']):.3f} later {kendall_tau(out['later'], L['later']):.3f} he {kendall_tau(out['he'], L['he']):.3f}", flush=True)
vals = torch.log1p(LT["train"]); n = len(tr)
# kNN with confidence: value at several k, top-1 sim, mean top-k sim
keys = torch.nn.functional.normalize(E["train"], dim=1).half().float()
def knn_feats(k, loo=False):
    q = torch.nn.functional.normalize(E[k], dim=1)
    sims = q @ keys.T
    if loo: sims[torch.arange(len(q)), torch.arange(len(q))] = -math.inf
    top, idx = sims.topk(500, dim=1)
    cols = []
    for kk, T in ((10, 0.05), (50, 0.05), (200, 0.1), (500, 0.1)):
        w = torch.softmax(top[:, :kk] / T, 1); cols.append((w * vals[idx[:, :kk]]).sum(1))
    cols += [top[:, 0], top[:, :10].mean(1), vals[idx[:, 0]]]
    return torch.stack(cols, 1)
K = {k: knn_feats(k, loo=(k == "train")) for k in ("train", "val", "test", "later", "he")}
for j, nm in enumerate(["k10", "k50", "k200", "k500"]):
    rep(f"knn {nm}", lambda k, j=j: K[k][:, j].numpy())
# OOF linear score
folds = np.random.default_rng(0).permutation(n) % 5; oof = torch.zeros(n)
for f in range(5):
    a, b = torch.from_numpy(folds != f), torch.from_numpy(folds == f)
    h = fit_head(HeadSpec("linear"), E["train"][a], LT["train"][a], pw, val=None, val_metric=acc, epochs=15).head
    with torch.no_grad(): oof[b] = h(E["train"][b])
lin = fit_head(HeadSpec("linear"), E["train"], LT["train"], pw, val=(E["val"], None, L["val"]), val_metric=acc).head
with torch.no_grad(): S = {k: (oof if k == "train" else lin(E[k])) for k in K}
from sklearn.ensemble import HistGradientBoostingRegressor
for name, cols in (("GBT feats+lin+knn(all)", lambda k: torch.cat([F[k], S[k][:, None], K[k]], 1)),
                   ("GBT feats+lin+knn200", lambda k: torch.cat([F[k], S[k][:, None], K[k][:, 2:3]], 1))):
    g = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, random_state=0, early_stopping=True, validation_fraction=0.1)
    g.fit(cols("train").numpy(), np.log1p(L["train"]))
    rep(name, lambda k: g.predict(cols(k).numpy()))
# MLP / linear stackers on [f, oof lin, knn feats] (pairwise), and on [e, f, knn feats]
for name, spec, X in (
    ("linear stack [f, lin, knn*]", HeadSpec("linear"), lambda k: torch.cat([F[k], S[k][:, None], K[k]], 1)),
    ("mlp64 stack [f, lin, knn*]", HeadSpec("mlp", units=64), lambda k: torch.cat([F[k], S[k][:, None], K[k]], 1)),
    ("mlp256 [e, f, knn*]", HeadSpec("mlp", units=256), lambda k: torch.cat([E[k], F[k], K[k]], 1)),
    ("linear [e, f, knn*]", HeadSpec("linear"), lambda k: torch.cat([E[k], F[k], K[k]], 1)),
):
    t = time.time()
    h = fit_head(spec, X("train"), LT["train"], pw, val=(X("val"), None, L["val"]), val_metric=acc,
                 dropout=0.1 if spec.kind == "mlp" else 0.0).head
    with torch.no_grad(): rep(name + f" ({time.time()-t:.0f}s)", lambda k: h(X(k)).numpy())
