#!/usr/bin/env bash
# Device run (one-off, not committed): GPU tests of the new code, then bench_gemv of f133d00
# (.old) and of this tree side by side (ABAB), then bench_decode if asked ($1 = decode).
set -uo pipefail
export PYTHONUNBUFFERED=1 NEW=$(cat .commit 2>/dev/null || echo new)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpu.txt
if [ "${1:-gemv}" = gemv ]; then
  PYTHONPATH=. timeout 240 python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_kernels.py \
    tests/test_decode_kernels.py tests/test_attention_kernel.py tests/test_sparse_linear.py tests/test_layering.py \
    > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?"; tail -4 $OUT/pytest_gpu.log
  for i in 1 2; do
    (cd .old && PYTHONPATH=. timeout 150 python3 scripts/bench_gemv.py --json $OUT/gemv_old$i.json > $OUT/gemv_old$i.log 2>&1); echo "old$i rc=$?"
    PYTHONPATH=. timeout 150 python3 scripts/bench_gemv.py --json $OUT/gemv_new$i.json > $OUT/gemv_new$i.log 2>&1; echo "new$i rc=$?"
  done
  tail -40 $OUT/gemv_new1.log | head -70
  python3 scripts/bench_compare.py --old $OUT/gemv_old*.json --new $OUT/gemv_new*.json | tee $OUT/gemv_compare.txt
else
  (cd .old && TEAL_COMMIT=f133d00 PYTHONPATH=. timeout 280 python3 scripts/bench_decode.py --models Meta-Llama-3-8B \
     --sparsities 0 0.5 --runs 5 --json $OUT/decode_old.json > $OUT/decode_old.log 2>&1); echo "old rc=$?"
  TEAL_COMMIT=$NEW PYTHONPATH=. timeout 280 python3 scripts/bench_decode.py --models Meta-Llama-3-8B \
     --sparsities 0 0.5 --runs 5 --json $OUT/decode_new.json > $OUT/decode_new.log 2>&1; echo "new rc=$?"
  tail -5 $OUT/decode_old.log; tail -5 $OUT/decode_new.log
  python3 scripts/bench_compare.py --old $OUT/decode_old.json --new $OUT/decode_new.json | tee $OUT/decode_compare.txt
fi
