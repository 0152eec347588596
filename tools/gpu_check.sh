#!/usr/bin/env bash
# For a session that has a GPU: the CUDA tests and the benchmarks the open issues name, in
# one short run (about 10 minutes on one H100). Results land in ${OUT:-gpu-check}/.
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt" || exit 1
# 1. CUDA tests (the closed solver on CUDA against the CPU) and the solver tests
python -m pytest -q tests/test_solver_closed.py -k "cuda or warm_start or planted" \
    2>&1 | tail -5 | tee "$out/tests.txt"
# 2. solver micro-benchmark on the device (issue 2's table, K-SVD iteration on CUDA)
timeout 120 python tools/bench_solvers.py --device cuda --shapes smollm2 --json \
    > "$out/bench_solvers.json" 2> "$out/bench_solvers.txt"
# 3. issue 10: one Llama-3-70B-width block through the pipeline on the GPU (full widths;
#    needs ~10 GB host RAM for the float64 Grams) and the projected 70B time
timeout 420 python tools/bench_scale.py --scale 1.0 --blocks 1 --device cuda \
    --calib-samples 16 --seq-len 1024 --torch-threads 8 --json > "$out/bench_scale.json" \
    2> "$out/bench_scale.txt"
tail -3 "$out"/*.txt
