#!/usr/bin/env bash
# The papers' own protocols beside vitlens' defaults on the committed fashion checkpoints (CPU, small n):
# WSOL metrics (default vs --protocol wsol), the grid pointing game (default vs --protocol bcos) and the
# full-cascade sanity check. Run from the repository root; writes benchmarks/protocols/*.json and *.txt.
set -euo pipefail
out=benchmarks/protocols
ev() { name=$1; shift; python -m vitlens evaluate --gallery 0 --out "$out/$name.json" "$@" > "$out/$name.txt"; }
ev wsol-default --model vitlens:fashion-vit-pm --methods pm,rollout,gae --metrics maxboxacc,maxboxacc-v2,pxap \
  --data fashion-canvas:test --limit 200
ev wsol-wsol --model vitlens:fashion-vit-pm --methods pm,rollout,gae --metrics maxboxacc,maxboxacc-v2,pxap \
  --data fashion-canvas:test --limit 200 --protocol wsol
ev grid-default --model vitlens:fashion-bcos-vit --methods bcos --metrics grid-pointing-game \
  --data fashion-grid:test --limit 32
ev grid-bcos --model vitlens:fashion-bcos-vit --methods bcos --metrics grid-pointing-game \
  --data fashion-grid:test --limit 32 --protocol bcos
ev sanity-baselines --model vitlens:fashion-vit-pm --methods pm,attention,rollout,gae,gradcam --metrics sanity \
  --data fashion-canvas:test --limit 16
ev sanity-diffmask --model vitlens:fashion-vit-diffmask --methods diffmask --metrics sanity \
  --data fashion-canvas:test --limit 16
ev sanity-bcos --model vitlens:fashion-bcos-vit --methods bcos --metrics sanity --data fashion-canvas:test --limit 16
# Perturbation protocols on fashion-vit-diffmask (the fashion-vit backbone with DiffMask's gates), maps of the
# predicted class as Chefer et al. and Vision DiffMask evaluate them.
pert=(--model vitlens:fashion-vit-diffmask --methods diffmask,attention,rollout,gae,chefer,gradcam
  --data fashion-canvas:test --limit 128 --target predicted)
ev perturbation-default "${pert[@]}" --metrics positive-perturbation,negative-perturbation
ev perturbation-chefer "${pert[@]}" --metrics positive-perturbation,negative-perturbation --protocol chefer \
  --option rollout.start_layer=1 --option chefer.start_layer=1
ev perturbation-diffmask "${pert[@]}" --metrics positive-perturbation,negative-perturbation --protocol diffmask
ev causal-default "${pert[@]}" --metrics insertion,deletion,road
ev causal-rise "${pert[@]}" --metrics insertion,deletion --protocol rise
# The full-cascade sanity check on the counting models too (every shipped model).
ev sanity-counting --model vitlens:counting-vit --methods attention,rollout,gae,chefer,gradcam --metrics sanity \
  --data counting:test --limit 16
ev sanity-counting-diffmask --model vitlens:counting-vit-diffmask --methods diffmask --metrics sanity \
  --data counting:test --limit 16
ev sanity-fashion-vit --model vitlens:fashion-vit --methods attention,rollout,gae,chefer,gradcam --metrics sanity \
  --data fashion-canvas:test --limit 16
