#!/usr/bin/env bash
# A few steps of every stage of the 256-px recipe's miniature (configs/1d_256_mini.yaml) on CUDA: the
# parquet dataset, the f8 KL autoencoder with its PatchGAN and the 1D tokenizer (torchrun, DDP, bf16
# autocast), then a GPT-B-shaped prior (deepspeed, ZeRO-2, bf16) on 1 GPU, and on 2 when present.
# Prints each stage's time and the prior's MFU against the device's dense bf16 peak.
#
#   bash benchmarks/gpu_smoke.sh                # OUT=runs/gpu_smoke by default
#   DEVICE=cpu bash benchmarks/gpu_smoke.sh     # the same chain on 2 CPU ranks (checks the script itself)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_smoke}
if [ "$DEVICE" = cuda ]; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS" -ge 1 ] || { echo "gpu_smoke: no CUDA device (DEVICE=cpu runs the chain on CPU ranks)" >&2; exit 2; }
  RANKS="1"; [ "$GPUS" -ge 2 ] && RANKS="1 2"
  PRIOR=(prior.dim=768 prior.depth=12 prior.heads=12 prior_train.micro_batch_size=64 prior_train.steps=60)
else
  RANKS="2"
  PRIOR=(prior_train.steps=6)
fi
python -c "import torch; print('torch', torch.__version__, '| devices:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or 'cpu')"
rm -rf "$OUT"
python -m flextok.export_parquet --source builtin:skimage --out "$OUT/data" data.resolution=64 \
  data.crops_per_photo=64 data.eval_crops_per_photo=8
for N in $RANKS; do
  RUN="$OUT/ranks$N"
  COMMON=(--config configs/1d_256_mini.yaml "out_dir=$RUN" "data.source=hf:$OUT/data" data.eval_images=16)
  TOKENIZER=(train.device="$DEVICE" train.steps=8 train.eval_every=8 train.checkpoint_every=4 train.log_every=2)
  timed() { local start=$SECONDS; "$@"; echo "gpu_smoke: ranks=$N ${STAGE}: $((SECONDS - start)) s"; }
  STAGE=autoencoder timed torchrun --nproc_per_node "$N" train_tokenizer.py "${COMMON[@]}" tokenizer=grid \
    name=mini_kl_f8c16 "${TOKENIZER[@]}" loss.adversarial_start=4
  STAGE=1d_tokenizer timed torchrun --nproc_per_node "$N" train_tokenizer.py "${COMMON[@]}" "${TOKENIZER[@]}" \
    "flextok.autoencoder=$RUN/mini_kl_f8c16/final"
  STAGE=prior timed deepspeed --num_gpus "$N" train_prior.py "${COMMON[@]}" "prior.tokenizer=$RUN/1d_256_mini/final" \
    prior_train.eval_every=1000 prior_train.sample_every=1000 prior_train.checkpoint_every=1000 \
    prior_train.log_every=10 prior_train.num_samples=8 "${PRIOR[@]}"
  python benchmarks/prior_mfu.py --config configs/1d_256_mini.yaml --run "$RUN/1d_256_mini_prior" --ranks "$N" \
    "${PRIOR[@]}"
done
