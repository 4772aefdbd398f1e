#!/usr/bin/env bash
# The GPU check for a session that is lent a CUDA machine: one short command (a few minutes on one GPU), every result
# under $OUT. Run from the repository root with the package installed and a CUDA build of torch:
#     OUT=/tmp/gpu bash benchmarks/gpu/check.sh
# Not run yet: no GPU has been lent to this project's sessions, so docs/benchmarks.md says "not measured".
set -euo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"
# flashoptim's CUDA-only paths: error-correction bits, quantized moments, the fused step (skipped on CPU).
python -m pytest -q -p no:cacheprovider tests/integration/test_flash_cuda.py 2>&1 | tee "$OUT/flash_cuda_tests.txt"
# The language-model benchmark on the GPU, bf16-flash with FlashAdamW(master_weight_bits=24) beside the CPU recipes.
python benchmarks/lm_convergence.py --accelerator cuda \
    --recipes "32-true,bf16-mixed,bf16-true+adamw,bf16-true+compensated,bf16-true+optimi-kahan,bf16-flash" \
    --out "$OUT/lm_convergence_cuda.txt" --plot "$OUT/lm_convergence_cuda.png" 2>&1 | tee "$OUT/lm_convergence_cuda.log"
