#!/usr/bin/env bash
# GPU cost figures of the model core and every token-reduction plug-in, in one run: full size,
# bf16, batch 1, random weights (cost does not depend on them). Needs torch, timm,
# transformers, safetensors, sentencepiece, numpy; not the simulator.
#   scripts/device_check.sh                       # on a CUDA machine, results in $OUT or results/device
#   SIZE=tiny DEVICE=cpu DTYPE=bf16 scripts/device_check.sh  # the same steps on a CPU, as a smoke test
set -euo pipefail
SUMMARY=summary.txt FAILED=failed.txt
source "$(dirname "$0")/device_common.sh"
# Few result files, so that a remote run returns all of them (the batching comparison,
# scripts/lightvla_batching.py, and the product timing, scripts/llm_gemm_timing.py, run on their own).
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$DEST/summary.txt"
checks() {
failed=0
# Most telling first, so that a run cut short keeps it. Limits: about 2.5x each step's time on
# an H100 (39, 30, 47, 44, 27, 15 s), 530 s in all, so the whole run fits one 600 s command.
# OFT and LightVLA at 78 under each speedup alone and all together (each variant saved as it
# finishes; compiling ones last).
step "${LIMIT_VARIANTS:-110}" $PY scripts/speedup_variants.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --repeats 20 --save "$DEST/variants.json"
# OFT with the transformers yardstick, then every method relative to OFT in one run, with the
# default speedups (on a GPU, every one it can use) and with none.
step "${LIMIT_OFT:-80}" $PY -m bench profile --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --repeats 50 --warmup 5 --save "$DEST/oft.json"
step "${LIMIT_SWEEP:-130}" $PY -m bench profile --sweep --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --repeats 30 --warmup 5 --save "$DEST/sweep.json"  # saved row by row: a step cut short keeps its rows
step "${LIMIT_SWEEP_PLAIN:-90}" $PY -m bench profile --sweep --speedups none --size "$SIZE" --device "$DEVICE" \
  --dtype "$DTYPE" --repeats 30 --warmup 5 --save "$DEST/sweep_plain.json"
# Wall time against kernel time, then every plug-in's path on the tiny model.
step "${LIMIT_KERNELS:-70}" $PY scripts/kernel_breakdown.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --save "$DEST/kernels.json"
step "${LIMIT_TINY:-50}" $PY -m bench profile --sweep --size tiny --device "$DEVICE" --dtype "$DTYPE" --repeats 5 --warmup 2
# Each target, met or not, from the files above.
$PY scripts/device_targets.py "$DEST" | tee -a "$DEST/summary.txt"
return $failed
}
# The whole output in a file too: a remote run returns only the end of what it prints.
checks 2>&1 | tee -a "$DEST/device_check.log"
exit "${PIPESTATUS[0]}"
