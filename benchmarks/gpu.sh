#!/bin/sh
# The GPU figures of benchmarks/RESULTS.md: every method at ViT-B/16, 224 px, batch 64, fp32 and bf16
# autocast, vitlens beside captum and pytorch-grad-cam on the same GPU, and the GPU tests. Run from the
# repository root with the project's environment active: sh benchmarks/gpu.sh OUT_DIR
set -eu
out=${1:-benchmarks/bench_vit_base_gpu}
model='timm:vit_base_patch16_224?pretrained=0'
bcos='bcos:simple_vit_b_patch16_224?pretrained=0'
mkdir -p "$out"
nvidia-smi -L > "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.log"
for precision in fp32 bf16; do
    flag=$([ "$precision" = bf16 ] && echo "--autocast bf16" || true)
    # shellcheck disable=SC2086
    python3 benchmarks/bench_methods.py --out "$out/$precision" --model "$model" --bcos-model "$bcos" \
        --device cuda --batch-size 64 --repeat 10 $flag
    python3 benchmarks/bench_table.py "$out/$precision" > "$out/$precision.md"
done
python3 benchmarks/peers.py --model "$model" --device cuda --batch-size 64 --steps 32 --occlusion-window 1 \
    --repeat 5 > "$out/peers.json"
python3 -c "import json, sys; sys.path.insert(0, 'benchmarks'); from peers import markdown; \
print(markdown(json.load(open('$out/peers.json'))))" > "$out/peers.md"
