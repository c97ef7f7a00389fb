#!/usr/bin/env bash
# `make demo`: the whole road on built-in synthetic data -- videos -> TV-L1 flow -> RGB/RGBF shards -> asym3d (the
# paper's network) trained on splits 1,2,3 for RGB and RGBF -> evaluation of each and of their fusion -> one table
# -> `asym3d predict` with the fused runs on a few video files.
#
# Usage: bash scripts/demo.sh [OUT]   (default demo_out; needs `asym3d` on PATH, which `make demo` arranges)
#
# THIS IS NOT THE PAPER'S PROTOCOL. Everything is shrunk to fit ~10 minutes on a 2-core laptop CPU:
#   data      4 classes (the demo generator's first four: translate up/down, static, oscillate; chance 25%), 18 videos per class
#             in 18 groups (scenes; split N tests the N-th third: 48 train / 24 test videos per split), 20 frames of 40x53
#             pixels per video                                  (paper: UCF-101, 13,320 videos at 128x171)
#   flow      OpenCV TV-L1 on the CPU with its default parameters (the paper's flow), at 40x53
#   network   asym3d from the registry, on 16x32x32 clips        (paper: 16x112x112)
#             + BatchNorm after every conv (--batch-norm, not in the paper), dropout 0.2 (paper 0.5), the trainer's
#               default initialisation (--weight-init he-torchfc; the paper's Caffe fillers are --weight-init c3d;
#               why: BENCHMARKS.md, "Training from scratch")
#   training  from scratch, 12 epochs of one clip per video, batch 4, SGD lr 3e-3 constant
#                                                                (paper: pre-training on FCVID, then fine-tuning)
#   testing   3 clips x 10 crops per video                       (paper: 25 clips x 10 crops)
# Every input ends above 2x chance on every split's mean (the measured table, and why the data and the learning rate
# are what they are: BENCHMARKS.md, "make demo").
# The paper's horizontal-flip augmentation (training and the mirrored test crops) turns TranslateRight into
# TranslateLeft (and RotateCW into RotateCCW), so the generator lists the mirror-symmetric motions first.
#
# Rerunning reuses completed stages (extract-flow and build-rgbf skip complete shards, a finished training split is
# kept, an unfinished one resumes). When the settings below change, OUT's previous results are removed first.
set -euo pipefail

OUT=${1:-demo_out}

CLASSES=4
VIDEOS_PER_CLASS=18
SCENE_GROUPS=18
FRAMES=20
SIZE=40x53
SEED=0
MODEL=asym3d
WEIGHT_INIT=he-torchfc
CLIP=16x32x32
EPOCHS=12
BATCH=4
LR=3e-3
DROPOUT=0.2
CLIPS=3
CROPS=10
SPLITS=(1 2 3)

SETTINGS="generator=4 classes=$CLASSES videos_per_class=$VIDEOS_PER_CLASS groups=$SCENE_GROUPS frames=$FRAMES size=$SIZE seed=$SEED \
model=$MODEL weight_init=$WEIGHT_INIT clip=$CLIP epochs=$EPOCHS batch=$BATCH lr=$LR dropout=$DROPOUT batch_norm=1 clips=$CLIPS crops=$CROPS"

DATA=$OUT/data
FLOW=$OUT/flow
SHARDS=$OUT/shards
RUNS=$OUT/runs
LOGS=$OUT/logs

asym3d models
echo

mkdir -p "$OUT"
if [[ -f $OUT/settings.txt && "$(cat "$OUT/settings.txt")" != "$SETTINGS" ]]; then
    echo "$OUT: made with other settings; removing its previous data and results"
    rm -rf "$DATA" "$FLOW" "$SHARDS" "$RUNS" "$LOGS"
fi
mkdir -p "$LOGS" "$RUNS"
echo "$SETTINGS" > "$OUT/settings.txt"

cat <<EOF
asym3d demo -- a SMALL stand-in for the paper's protocol, sized for ~10 minutes on 2 CPU cores:
  data     $CLASSES motion classes (chance $((100 / CLASSES))%), $VIDEOS_PER_CLASS videos/class, $FRAMES frames of $SIZE, 3 splits by group
  network  $MODEL on ${CLIP} clips (paper 16x112x112), --batch-norm, dropout $DROPOUT, --weight-init $WEIGHT_INIT, from scratch
  train    $EPOCHS epochs, batch $BATCH, lr $LR        test  $CLIPS clips x $CROPS crops (paper 25 x 10)
  logs     $LOGS/
EOF
echo

# stage NAME LOG COMMAND...: run COMMAND with its output in LOG, print one line; on failure the log's tail, then stop.
stage() {
    local name=$1 log=$2
    shift 2
    local start=$SECONDS
    if "$@" > "$log" 2>&1; then
        printf '%-34s done in %4ds\n' "$name" $((SECONDS - start))
    else
        printf '%-34s FAILED after %ds; last lines of %s:\n' "$name" $((SECONDS - start)) "$log"
        tail -n 20 "$log" | tr '\r' '\n' | tail -n 20
        exit 1
    fi
}

# epochs_done RUN_SPLIT_DIR: how many epochs its metrics.csv records (0 when none).
epochs_done() {
    if [[ -f $1/metrics.csv ]]; then echo $(($(wc -l < "$1/metrics.csv") - 1)); else echo 0; fi
}

stage "make-demo-data" "$LOGS/make-demo-data.log" \
    asym3d make-demo-data "$DATA" --classes $CLASSES --videos-per-class $VIDEOS_PER_CLASS --groups $SCENE_GROUPS \
    --frames $FRAMES --size $SIZE --seed $SEED
stage "extract-flow (TV-L1, CPU)" "$LOGS/extract-flow.log" \
    asym3d extract-flow "$DATA/videos" "$FLOW" --dataset ucf101 --splits-dir "$DATA/splits" --size $SIZE \
    --backend cpu --jobs 2 --videos-per-shard 6
stage "build-rgbf" "$LOGS/build-rgbf.log" asym3d build-rgbf "$FLOW" "$SHARDS"

for input in rgb rgbf; do
    for split in "${SPLITS[@]}"; do
        run=$RUNS/$input/split$split
        if [[ -f $run/best.pt && $(epochs_done "$run") -ge $EPOCHS ]]; then
            printf '%-34s already done\n' "train $input split $split"
            continue
        fi
        resume=()
        [[ -f $run/last.pt ]] && resume=(--resume)
        stage "train $input split $split" "$LOGS/train_${input}_split$split.log" \
            asym3d train "$SHARDS" --model $MODEL --input $input --split "$split" --out "$run" --clip $CLIP \
            --epochs $EPOCHS --batch-size $BATCH --lr $LR --batch-norm --dropout $DROPOUT --weight-init $WEIGHT_INIT --workers 1 \
            "${resume[@]}"
    done
done

split_list=$(IFS=,; echo "${SPLITS[*]}")
for input in rgb rgbf; do
    results=$RUNS/$input/eval/results.json
    if [[ -f $results && -z $(find "$RUNS/$input" -name best.pt -newer "$results") ]]; then
        printf '%-34s already done\n' "evaluate $input"
        continue
    fi
    # a report names the checkpoints it scored, so one of checkpoints trained since is refused, not replaced:
    # the demo drops its own stale report (and the fusion made from it) first
    rm -rf "$RUNS/$input/eval" "$RUNS/rgb/eval/fused_rgb+rgbf"
    stage "evaluate $input (splits $split_list)" "$LOGS/evaluate_$input.log" \
        asym3d evaluate "$RUNS/$input" --splits "$split_list" --clips $CLIPS --crops $CROPS
done
stage "evaluate --fuse rgb rgbf" "$LOGS/evaluate_fused.log" \
    asym3d evaluate --fuse "$RUNS/rgb" "$RUNS/rgbf" --splits "$split_list"

echo
python - "$RUNS/rgb/eval/results.json" "$RUNS/rgbf/eval/results.json" "$RUNS/rgb/eval/fused_rgb+rgbf/results.json" \
    "$CLASSES" <<'EOF'
"""The final table from the evaluator's own reports, and an honest verdict on RGBF vs RGB."""
import json
import sys

paths, classes = sys.argv[1:4], int(sys.argv[4])
names = ("RGB", "RGBF", "RGB+RGBF fused")
reports = []
for path in paths:
    with open(path) as f:
        reports.append(json.load(f))
splits = sorted(reports[0]["splits"], key=int)
print("top-1 accuracy (video level)")
print(f"{'input':<16}" + "".join(f"{'split ' + s:>10}" for s in splits) + f"{'mean':>10}")
for name, report in zip(names, reports):
    cells = "".join(f"{report['splits'][s]['top1']:>10.1%}" for s in splits)
    print(f"{name:<16}{cells}{report['mean']['top1']:>10.1%}")
print(f"chance: {1 / classes:.1%}")
rgb, rgbf = reports[0]["mean"]["top1"], reports[1]["mean"]["top1"]
if rgbf > rgb:
    verdict = f"RGBF beat RGB here: {rgbf:.1%} vs {rgb:.1%} mean top-1 over splits."
elif rgbf == rgb:
    verdict = f"RGBF tied RGB here: both {rgb:.1%} mean top-1 over splits."
else:
    verdict = f"RGBF did NOT beat RGB here: {rgbf:.1%} vs {rgb:.1%} mean top-1 over splits."
print(verdict)
EOF
echo "reports: $RUNS/{rgb,rgbf}/eval/results.md, $RUNS/rgb/eval/fused_rgb+rgbf/; curves: $RUNS/*/split*/curves.png"

# The use of a trained network: `asym3d predict` on video files (here one test video of split 1 per class, which the
# split-1 runs never trained on), its input made from the video as the shards were made, RGB and RGBF runs fused.
echo
echo "asym3d predict: the split-1 RGB + RGBF runs fused, on one split-1 test video per class ($CLIPS clips x $CROPS crops)"
mapfile -t PREDICT_VIDEOS < <(tr -d '\r' < "$DATA/splits/testlist01.txt" | awk -F/ '!seen[$1]++ {print $0}' \
    | sed "s|^|$DATA/videos/|")
start=$SECONDS
asym3d predict "$RUNS/rgb" "$RUNS/rgbf" "${PREDICT_VIDEOS[@]}" --split 1 --clips $CLIPS --crops $CROPS --top 2 \
    --flow-backend cpu --json > "$LOGS/predict.json" 2> "$LOGS/predict.log" || { tail -n 5 "$LOGS/predict.log"; exit 1; }
python - "$LOGS/predict.json" <<'EOF'
"""Each video's true class (its directory) beside the top-2 the fused runs give it."""
import json
import sys
from pathlib import Path

for entry in json.load(open(sys.argv[1])):
    top = ", ".join(f"{t['class']} {t['probability']:.2f}" for t in entry["top"])
    truth = Path(entry["video"]).parent.name
    mark = "right" if entry["top"][0]["class"] == truth else "wrong"
    print(f"  {Path(entry['video']).name:<34} true {truth:<16} predicted {top}   ({mark})")
EOF
echo "  (predict took $((SECONDS - start)) s for ${#PREDICT_VIDEOS[@]} videos: decoding, TV-L1, RGBF and 2 runs x $((CLIPS * CROPS)) views each)"
# On a shared machine wall time says little about the demo itself: print the CPU time its stages used and the load.
times > "$LOGS/times.txt"  # in this shell: a subshell's `times` would not count this script's stages
read -r cpu_user cpu_sys < <(tail -n 1 "$LOGS/times.txt")
echo "this run: ${SECONDS} s wall, its stages' CPU user $cpu_user sys $cpu_sys; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
