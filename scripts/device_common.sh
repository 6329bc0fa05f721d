# Shared by the device scripts (sourced after setting SUMMARY and FAILED, file names in $DEST):
# the settings from the environment, and `step`, which runs one measurement under a time limit.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-auto}  # auto: bf16 on a GPU
DEST=${OUT:-results/device}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee "$DEST/$SUMMARY"
step() {  # step LIMIT_S COMMAND...: a failed or overlong step is reported and the next one still
  local limit=$1 start=$SECONDS; shift  # runs (device time is scarce); 0 means no limit
  timeout "$limit" "$@" || { echo "FAILED ($?): $*" | tee -a "$DEST/$FAILED"; failed=1; }
  echo "step took $((SECONDS - start)) s: $*" | tee -a "$DEST/$SUMMARY"
}
