#!/usr/bin/env bash
# The CUDA path end to end: NeuMF and the two-tower model trained with trainer=gpu on the default
# synthetic data, fp32 and bf16-mixed, with the results tables and wall times printed.
#   bash bench/gpu_smoke.sh            (needs a CUDA GPU and the project installed)
set -euo pipefail
out=${OUT:-/tmp/rectrain-gpu}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
run() {
  local name=$1; shift
  local start=$(date +%s.%N)
  python3 train.py trainer=gpu "paths.output_dir=$out/$name" "paths.cache_dir=$out/cache" \
    callbacks.progress_bar=null trainer.enable_progress_bar=false "$@" > "$out/$name.log" 2>&1 \
    || { echo "FAILED: $name"; tail -30 "$out/$name.log"; return 1; }
  local end=$(date +%s.%N)
  echo "== $name ($*): $(python3 -c "print(f'{$end - $start:.1f}')") s"
  grep -E '^\|' "$out/$name.log" | tail -4
}
run neumf_fp32 model=neumf trainer.max_epochs=5
run two_tower_fp32 model=two_tower trainer.max_epochs=5
run two_tower_bf16 model=two_tower trainer.max_epochs=5 trainer.precision=bf16-mixed
run two_tower_lstm_sampled model=two_tower trainer.max_epochs=3 model.net.cell=lstm model.loss=sampled model.extra_negatives=256
