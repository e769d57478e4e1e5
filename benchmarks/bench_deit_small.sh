#!/bin/sh
# The performance issue's table (benchmarks/RESULTS.md): every method at deit_small, 224 px, batch 16, CPU,
# as a ratio to one plain forward pass of the same batch in the same process. Run from the repository root
# with the project's environment active. On a machine shared with other jobs add --cpu-time (one thread,
# process CPU time), as the recorded figures do. Single methods: vitlens bench --model M --methods a,b --json
set -eu
python benchmarks/bench_methods.py --out benchmarks/bench_deit_small --batch-size 16 --repeat 5 "$@"
python benchmarks/bench_table.py benchmarks/bench_deit_small
