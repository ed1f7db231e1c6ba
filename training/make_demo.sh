#!/usr/bin/env bash
# Regenerate the bundled aim-demo model from scratch on a CPU, with its evidence:
#   bash training/make_demo.sh            (from the repository root; about an hour on 2 cores)
# Needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist). Everything intermediate
# goes to runs/ (git-ignored); the results land in aimcore/assets/aim-demo/ and docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=runs/data/fashion-mnist          # 55k train / 5k val / 10k test, pre-training reads train/ without labels
PROBE_DATA=runs/data/fashion-mnist-600  # 600 train + 200 held-out per class: the probe budget of docs/DEMO_MODEL.md
RUN=runs/aim-demo
ASSETS=aimcore/assets/aim-demo

[ -d "$DATA/train" ] || $PY -m training.datasets.fashion_mnist --out "$DATA"
[ -d "$PROBE_DATA/train" ] || $PY -m training.datasets.fashion_mnist --out "$PROBE_DATA" --limit-per-class 600

# 1. Pre-train (training/configs/aim-demo.yaml: 1200 steps x 64 images, bf16, a checkpoint every 150 steps).
$PY training/pretrain.py --config training/configs/aim-demo.yaml --data "$DATA/train" \
    --data.val_path "$DATA/val" --checkpoint.dir "$RUN" --log.progress_bar false

# 2. Attentive probe on the final trunk (frozen), the head in the released head.* layout.
$PY training/probe.py --checkpoint "$RUN/trunk.safetensors" --data "$PROBE_DATA" --val-per-class 200 \
    --out runs/probe/aim-demo --threads 2

# 3. The two baselines with the same probe budget: random-init trunk, linear classifier on raw pixels.
$PY -m training.baselines --data "$PROBE_DATA" --val-per-class 200 --flavor aim-demo \
    --out runs/baselines/fashion-mnist --threads 2

# 4. Bundle: trunk + head (labels in its metadata) + golden outputs for the service's boot self-check.
mkdir -p "$ASSETS"
cp "$RUN/trunk.safetensors" "$ASSETS/trunk.safetensors"
cp runs/probe/aim-demo/head.safetensors "$ASSETS/head.safetensors"
$PY -m service golden "$ASSETS" --out "$ASSETS/golden.npz"
# The int8 ONNX export: the service's CPU default with no configuration (fastest within cosine 0.999 of fp32).
rm -rf runs/aim-demo-onnx "$ASSETS/onnx-int8"
$PY -m export onnx --checkpoint "$ASSETS" --out runs/aim-demo-onnx --int8 --max-batch 32
cp -r runs/aim-demo-onnx/int8 "$ASSETS/onnx-int8"

# 5. Evidence: a trunk file per checkpoint, then validation loss vs probe top-1, Spearman, plot (docs/EVIDENCE.*).
$PY -m training.export_trunks "$RUN"
$PY training/evidence.py --run "$RUN" --data "$PROBE_DATA" --train-per-class 200 --val-per-class 100 --threads 2
