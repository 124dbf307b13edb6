#!/usr/bin/env bash
# The measurements of benchmarks/RESULTS.md, "Your own images": `clipdalle pipeline` on two collections that are not
# the built-in icons (benchmarks/make_collections.py) at 25 minutes, and the same plan without regularisation and best
# weights (--plain), and at 2 hours on one of them. Every figure of the comparisons is scored by one judge CLIP per collection,
# trained once on all of its images, so runs whose own CLIPs differ are judged alike.
#
#   PYTHONPATH=src bash benchmarks/collection_runs.sh [STEP ...]    # steps: collections judges fa6 words fa6-2h
#
# Each long step runs under `flock $LOCK` (one measurement on the machine at a time) and logs `uptime` before and after;
# the pipeline records the load average of every stage in OUT/summary.json.
set -euo pipefail
ART=${ART:-/work/artifacts/anydata}
LOCK=${LOCK:-/work/artifacts/.measure.lock}
PY=${PY:-python}
mkdir -p "$ART/logs"

logged() {  # logged NAME COMMAND...: the command under the lock, its output and the load before and after in a log
    local name=$1
    shift
    { echo "\$ $*"; uptime; } >"$ART/logs/$name.log"
    flock "$LOCK" "$@" >>"$ART/logs/$name.log" 2>&1
    uptime >>"$ART/logs/$name.log"
}

judges() {  # the demo CLIP's shape (64 x 3, 32 px) trained on every image of each collection, 3,000 steps of 128
    $PY - "$ART/judge-preset.json" <<'EOF'
import json, sys
from clipdalle.config import to_dict
from clipdalle.demo.plan import clip_config
model = to_dict(clip_config(32, 64, 3, context_length=24, vocab_size=1000))
train = {"steps": 3000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.2, "crop_scale": 0.8,
         "caption_templates": "{}|a picture of {}|an image of {}", "val_fraction": 0.0, "eval_every": 1000,
         "save_every": 500, "log_every": 50}
json.dump({"model": model, "train": train}, open(sys.argv[1], "w"))
EOF
    rm -rf "$ART/judge-fa6" "$ART/judge-words"
    local train="$PY -m clipdalle train clip --preset $ART/judge-preset.json"
    logged judges env OMP_NUM_THREADS=1 bash -c "$train --data $ART/fa6 --out $ART/judge-fa6 & \
        $train --data $ART/words --out $ART/judge-words & wait"
}

pipeline() {  # pipeline NAME COLLECTION FLAGS...: a fresh run in $ART/runs/NAME, judged by the collection's judge
    local name=$1 collection=$2
    shift 2
    rm -rf "$ART/runs/$name"
    logged "$name" $PY -m clipdalle pipeline --data "$ART/$collection" --out "$ART/runs/$name" \
        --judge-clip "$ART/judge-$collection" "$@"
}

compare() {  # compare NAME COLLECTION BASELINE FLAGS...: NAME's report drawn again beside the baseline's figures
    local name=$1 collection=$2 baseline=$3
    shift 3
    $PY -m clipdalle pipeline --data "$ART/$collection" --out "$ART/runs/$name" --judge-clip "$ART/judge-$collection" \
        --baseline "$ART/runs/$baseline" "$@" >>"$ART/logs/$name.log" 2>&1
}

steps=${*:-collections judges fa6 words fa6-2h}
for step in $steps; do
    case $step in
    collections)
        $PY benchmarks/make_collections.py fa6 --out "$ART/fa6"
        $PY benchmarks/make_collections.py words --out "$ART/words"
        ;;
    judges)
        judges
        ;;
    fa6 | words)  # the regularised run plans for 25 minutes; the plain one runs its plan without regularisation
        pipeline "$step-25m" "$step" --budget 25m
        pipeline "$step-25m-plain" "$step" --preset "$ART/runs/$step-25m/plan.json" --plain
        compare "$step-25m" "$step" "$step-25m-plain" --budget 25m
        ;;
    fa6-2h)
        pipeline fa6-2h fa6 --budget 2h --baseline "$ART/runs/fa6-25m"
        ;;
    *)
        echo "unknown step $step (collections judges fa6 words fa6-2h)" >&2
        exit 1
        ;;
    esac
done
