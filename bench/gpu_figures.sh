#!/usr/bin/env bash
# The GPU figures README asks for, in one go, on a machine with a CUDA device: datapoints (rows)
# per second at batch 100 -> 10,000 and the ratio to the CPU, from the benchmark scripts and the
# asv time_* suite. Timed GPU code synchronises; estimates use fp32 with TF32 off (the scripts set it).
#
# Usage: bench/gpu_figures.sh [OUT_DIR]      (about 10 minutes on one H100-class GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-figures}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt"
run() { echo "\$ $*" | tee -a "$out/commands.txt"; "$@" 2>&1 | tee "$out/$(echo "$*" | tr -c 'a-zA-Z0-9\n' '_' | cut -c1-80).txt"; }
run python bench/latent_gradient.py --device cuda --rows 100 1000 10000 --json
run python bench/latent_gradient.py --device cpu --rows 100 1000 10000 --json
run python bench/latent_gradient.py --device cuda --rows 100 1000 10000 --ais 100 1000 10000 --variants compiled --json
run python bench/step_ratio.py --device cuda --batch 100 --json
run python bench/step_ratio.py --device cuda --batch 10000 --json
if command -v asv > /dev/null; then
    asv machine --yes > /dev/null
    run asv run --python=same --set-commit-hash "$(git rev-parse HEAD)" --bench 'time_' --show-stderr
    run vaebench asv-table --benchmark time_
fi
