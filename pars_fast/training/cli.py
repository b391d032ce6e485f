"""``pars-fast train``: train a ranker from a recipe and/or flags, evaluate it, save it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from pars_fast.losses import LOSSES
from pars_fast.paths import default_ranker_dir
from pars_fast.ranker import RankerConfig, RankerLoadError
from pars_fast.training.config import DELTA_UNITS, FULL_HEAD_LR, KNN_MODES, MODES, TrainConfig
from pars_fast.training.recipes import RANKER_KEYS, RECIPES, recipe
from pars_fast.training.trainer import attach_eval_metrics, train

EVAL_SETS = ("test", "later", "humaneval")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    r = RankerConfig()
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default=None,
        help="named settings (docs/RANKING.md): fast, default (the default ranker's; what a run without --out "
        "trains), paper (PARS's full fine-tune), best; flags given here override the recipe's values",
    )
    parser.add_argument(
        "--data",
        default="sharegpt",
        help="sharegpt (first turns; trains on its 90%% split), sharegpt-all (all turns), humaneval, "
        "or FILE.jsonl (split 90/10 here)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer counting response lengths (serving model's folder; default: the ranker's)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: $PARS_FAST_HOME/rankers/default)")
    parser.add_argument("--loss", choices=LOSSES, default=None, help=f"default {d.loss}")
    parser.add_argument(
        "--mode", choices=MODES, default=None,
        help=f"full: fine-tune the encoder; head: frozen encoder, head trained on cached features (default {d.mode})",
    )
    parser.add_argument("--head", choices=("linear", "mlp"), default=None, help=f"score head (default {d.head})")
    parser.add_argument("--head-units", type=int, default=None, help=f"mlp head: hidden units (default {d.head_units})")
    parser.add_argument("--features", action=argparse.BooleanOptionalAction, default=None,
                        help="fuse cheap prompt features (length, lexical cues) into the head")
    parser.add_argument("--knn", choices=KNN_MODES, default=None,
                        help="kNN memory of the training prompts: off, blend (added to the score) or inputs "
                        f"(lookups feed the head) (default {d.knn})")
    parser.add_argument("--knn-k", type=int, default=None, help=f"kNN neighbours (default {d.knn_k})")
    parser.add_argument("--knn-temperature", type=float, default=None, help=f"default {d.knn_temperature}")
    parser.add_argument(
        "--backbone", default=None,
        help="local HF BERT-family folder, or a saved ranker folder to fit a new head on its (fine-tuned) "
        "encoder (default: all-MiniLM-L6-v2)",
    )
    parser.add_argument("--pooling", choices=("cls", "mean"), default=None, help=f"default {r.pooling}")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help=f"default {r.max_prompt_tokens}")
    parser.add_argument("--truncation", choices=("head", "head_tail"), default=None, help=f"default {r.truncation}")
    parser.add_argument("--head-tokens", type=int, default=None, help="head_tail: tokens kept from the start (default: half)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 (head), 1 (full)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (head), 32 (full)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (head), 2e-5 (full, encoder)")
    parser.add_argument("--head-lr", type=float, default=None, help=f"full mode: lr of a new head (default {FULL_HEAD_LR})")
    parser.add_argument("--weight-decay", type=float, default=None, help=f"default {d.weight_decay}")
    parser.add_argument("--delta", type=float, default=None, help="pair filter: keep |La-Lb|/max(La,Lb) >= delta (0.2)")
    parser.add_argument("--delta-unit", choices=DELTA_UNITS, default=None,
                        help="lengths the loss orders and filters pairs by: response tokens (default) or characters (PARS's code)")
    parser.add_argument("--margin", type=float, default=None, help=f"default {d.margin}")
    parser.add_argument(
        "--init-head", choices=("random", "probe"), default=None,
        help="full mode: start from a random head, or from one fitted on frozen features first (LP-FT)",
    )
    parser.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of N samples")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--evals-per-epoch", type=int, default=None, help=f"full mode (default {d.evals_per_epoch})")
    parser.add_argument("--val-frac", type=float, default=None, help=f"default {d.val_frac}")
    parser.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    parser.add_argument(
        "--eval", default="test",
        help="comma-separated evaluation sets after training (sharegpt data): test, later (sharegpt-later), humaneval",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-feature-cache", action="store_true", help="recompute frozen features")
    parser.add_argument("--json", action="store_true", help="print the result (metrics, timings) as JSON")


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, RankerConfig | None]:
    """The recipe's settings, overridden by every flag that was given.

    The RankerConfig is ``None`` when neither gives one of its keys: the backbone's
    own (a saved ranker's) or the defaults.
    """
    name = args.recipe
    if name is None and getattr(args, "out", None) is None:
        # Writing $PARS_FAST_HOME/rankers/default: train what "the default ranker" means
        # (the same recipe ensure_default_ranker trains), not the bare flag defaults.
        from pars_fast.training.default import DEFAULT_RECIPE

        name = DEFAULT_RECIPE
    settings: dict[str, Any] = recipe(name) if name else {}
    train_keys = {f.name for f in fields(TrainConfig)}
    for key in train_keys | set(RANKER_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    ranker_kw = {k: settings.pop(k) for k in RANKER_KEYS if k in settings}
    return TrainConfig(**settings), RankerConfig(**ranker_kw) if ranker_kw else None


def run(args: argparse.Namespace) -> int:
    from pars_fast.data import DatasetError, check_rankable, load_dataset, load_humaneval, sharegpt_later, sharegpt_split
    from pars_fast.data import train_test_split

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    tokenizer = args.tokenizer
    wanted = [s.strip() for s in args.eval.split(",") if s.strip()]
    unknown = set(wanted) - set(EVAL_SETS)
    if unknown:
        print(f"pars-fast train: error: unknown --eval sets {sorted(unknown)}; use {', '.join(EVAL_SETS)}", file=sys.stderr)
        return 2
    try:
        cfg, rcfg = configs_from_args(args)
        cfg.resolved()
        if rcfg is not None:
            rcfg.validate()
        if args.data in ("sharegpt", "sharegpt-all"):
            train_samples, test_samples = sharegpt_split(all_turns=args.data == "sharegpt-all", tokenizer=tokenizer)
            data_name, test_name = f"{args.data}-train", f"{args.data}-test"
            sets = {"test": test_samples}
            if "later" in wanted:
                sets["later"] = sharegpt_later(tokenizer=tokenizer)
            if "humaneval" in wanted:
                sets["humaneval"] = load_humaneval(tokenizer=tokenizer)
            sets = {k: v for k, v in sets.items() if k in wanted}
        else:
            all_samples = load_dataset(args.data, tokenizer=tokenizer)
            check_rankable(all_samples, cfg.delta, what=args.data)
            train_samples, test_samples = train_test_split(all_samples)
            data_name, test_name = f"{args.data} (90% split)", f"{args.data} (10% split)"
            sets = {"test": test_samples}
        result = train(
            train_samples,
            cfg,
            rcfg,
            backbone=args.backbone,
            device=args.device,
            progress=not args.no_progress,
            feature_cache=not args.no_feature_cache,
            data_name=data_name,
            recipe=args.recipe,
        )
    except (DatasetError, ValueError, FileNotFoundError, RankerLoadError) as exc:
        print(f"pars-fast train: error: {exc}", file=sys.stderr)
        return 2
    metrics = attach_eval_metrics(result.ranker, sets, cfg.delta, not args.no_feature_cache)
    if "test" in metrics:
        metrics["test"]["data"] = test_name
    out = Path(args.out) if args.out else default_ranker_dir()
    result.ranker.save(out)
    summary = {
        "out": str(out),
        "recipe": args.recipe,
        "loss": cfg.loss,
        "mode": cfg.mode,
        "head": result.ranker.head_spec.to_dict(),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "best": {k: v for k, v in result.best.items() if k != "val"},
        "val": result.best.get("val", {}),
        **{k: v for k, v in metrics.items()},
        "history": result.history,
        "timings_s": result.ranker.metadata.get("timings_s", {}),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        v = summary["val"]
        print(f"saved {cfg.mode}/{cfg.loss} ranker to {out} ({summary['timings_s'].get('total', 0):.0f} s)")
        if v:
            print(
                f"  validation: kendall_tau={v['kendall_tau']:.4f} "
                f"pairwise_accuracy={v['pairwise_accuracy']:.4f} (n={v['n']})"
            )
        for key, m in metrics.items():
            name = test_name if key == "test" else key
            print(
                f"  {name}: kendall_tau={m['kendall_tau']:.4f} ± {m['kendall_tau_se']:.4f} "
                f"pairwise_accuracy={m['pairwise_accuracy']:.4f} spearman={m['spearman']:.4f} (n={m['n']})"
            )
    return 0


__all__ = ["EVAL_SETS", "configs_from_args", "configure_parser", "run"]
