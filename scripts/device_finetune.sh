#!/usr/bin/env bash
# GPU figures of fine-tuning, in one run: full-size LightVLA training steps (random weights, bf16
# base, float32 adapters) at OpenVLA-OFT's per-GPU batch of 8 and at LightVLA's batch of 64 in 8
# micro-batches, then a whole `bench finetune` run of the tiny model on the device (trainer loop,
# validation, state, kept checkpoints) and `bench profile` of the checkpoint it wrote.
#   scripts/device_finetune.sh                                     # on a CUDA machine, results in $OUT or results/device
#   SIZE=tiny DEVICE=cpu DTYPE=bf16 scripts/device_finetune.sh     # the same steps on a CPU, as a smoke test
set -euo pipefail
SUMMARY=finetune_summary.txt FAILED=finetune_failed.txt
source "$(dirname "$0")/device_common.sh"
LARGE_BATCH=${LARGE_BATCH:-64}  # LightVLA's batch (the smoke test takes less)
checks() {
failed=0
# Limits: what the 600 s of one remote command allows (each full-size step builds the model anew).
step "${LIMIT_B8:-150}" $PY scripts/finetune_timing.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --policy lightvla --batch-size 8 --repeats 5 --warmup 2 --save "$DEST/finetune_b8.json"
step "${LIMIT_B64:-200}" $PY scripts/finetune_timing.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --policy lightvla --batch-size "$LARGE_BATCH" --grad-accumulation 8 --repeats 2 --warmup 1 --save "$DEST/finetune_b64.json"
# The whole command on the device, tiny model: data from a generated demonstration file.
RUN="$DEST/finetune_run"
rm -rf "$RUN" && mkdir -p "$RUN"
$PY -c "import sys; from pathlib import Path; from scripts.finetune_timing import generated_demos
for name, seed in (('train', 0), ('val', 1)): generated_demos(Path(sys.argv[1]) / f'{name}.hdf5', 40, 128, seed)" "$RUN"
step "${LIMIT_RUN:-100}" $PY -m bench finetune --policy lightvla --policy-arg size=tiny --device "$DEVICE" \
  --policy-arg dtype="$DTYPE" --demos "$RUN/train.hdf5" --val-demos "$RUN/val.hdf5" --val-samples 16 --steps 12 \
  --batch-size 8 --grad-accumulation 2 --save-every 6 --keep-checkpoints --log-every 3 --no-progress --out "$RUN/out"
step 60 $PY -m bench profile --policy lightvla --policy-arg checkpoint="$RUN/out/checkpoint" --size tiny \
  --device "$DEVICE" --dtype "$DTYPE" --repeats 10 --warmup 2 --no-yardstick --save "$DEST/finetune_checkpoint.json"
cp "$RUN/out/log.jsonl" "$DEST/finetune_log.jsonl" 2>/dev/null || true
rm -rf "$RUN"  # checkpoints stay on the machine: what comes back is the figures
return $failed
}
checks 2>&1 | tee -a "$DEST/device_finetune.log"
exit "${PIPESTATUS[0]}"
