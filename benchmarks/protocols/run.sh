#!/usr/bin/env bash
# The papers' own protocols beside vitlens' defaults on the committed fashion checkpoints (CPU, small n):
# WSOL metrics (default vs --protocol wsol), the grid pointing game (default vs --protocol bcos) and the
# full-cascade sanity check. Run from the repository root; writes benchmarks/protocols/*.json and *.txt.
set -euo pipefail
out=benchmarks/protocols
ev() { name=$1; shift; python -m vitlens evaluate --gallery 0 --out "$out/$name.json" "$@" > "$out/$name.txt"; }
ev wsol-default --model checkpoints/fashion-vit-pm --methods pm,rollout,gae --metrics maxboxacc,maxboxacc-v2,pxap \
  --data fashion-canvas:test --limit 200
ev wsol-wsol --model checkpoints/fashion-vit-pm --methods pm,rollout,gae --metrics maxboxacc,maxboxacc-v2,pxap \
  --data fashion-canvas:test --limit 200 --protocol wsol
ev grid-default --model checkpoints/fashion-bcos-vit --methods bcos --metrics grid-pointing-game \
  --data fashion-grid:test --limit 32
ev grid-bcos --model checkpoints/fashion-bcos-vit --methods bcos --metrics grid-pointing-game \
  --data fashion-grid:test --limit 32 --protocol bcos
ev sanity-baselines --model checkpoints/fashion-vit-pm --methods pm,attention,rollout,gae,gradcam --metrics sanity \
  --data fashion-canvas:test --limit 16
ev sanity-diffmask --model checkpoints/fashion-vit-diffmask --methods diffmask --metrics sanity \
  --data fashion-canvas:test --limit 16
ev sanity-bcos --model checkpoints/fashion-bcos-vit --methods bcos --metrics sanity --data fashion-canvas:test --limit 16
