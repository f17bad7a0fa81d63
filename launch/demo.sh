#!/usr/bin/env bash
# The LAPA pipeline on the built-in tabletop world, on a CPU. Installs into .venv if needed.
# Outputs go to $DEMO_DIR (default demo_out/); re-running resumes: finished steps are skipped and an
# interrupted training run continues from its last checkpoint.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# XLA:CPU's per-step temporaries on transparent huge pages, ~1.4x faster on a CPU (lapa_jax/host_memory.py);
# glibc reads it at process start, so it is set here. A value you chose is kept.
[[ ${GLIBC_TUNABLES:-} == *glibc.malloc.hugetlb* ]] ||
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
OUT="${DEMO_DIR:-demo_out}"
EPISODES="${DEMO_EPISODES:-200}"
LAQ_STEPS="${DEMO_LAQ_STEPS:-1600}"   # the demo preset's full schedule: ~8 min on 2 CPU cores
ROBOT="$OUT/data/lapa_world_robot/1.0.0"
mkdir -p "$OUT"

step() { echo; echo "== $*"; }

step "1/8 built-in world: robot episodes (with actions) and human-hand episodes (video only)"
for emb in robot hand; do
  if [ -d "$OUT/data/lapa_world_$emb" ]; then
    echo "   $OUT/data/lapa_world_$emb exists, skipping"
  else
    lapa world --embodiment "$emb" --episodes "$EPISODES" --out "$OUT/data" --seed 0
  fi
done

step "2/8 inspect the data: frames, frame pairs (x_t | x_t+H) and action histograms as PNGs"
lapa inspect-data --data-dir "$OUT/data" --mixture lapa_world_robot,lapa_world_hand --out "$OUT/inspect"

step "3/8 vision tokenizer: a VQGAN on the frames of both embodiments"
lapa train configs/tokenizer.py:demo --workdir "$OUT/tokenizer" \
  --config.data.data_dir="$OUT/data" --config.data.mixture=lapa_world_robot,lapa_world_hand
echo "   reconstructions: $OUT/tokenizer/images/"

step "4/8 stage 1: the latent action quantizer on the robot videos"
lapa train configs/laq.py:demo --workdir "$OUT/laq" --config.data.path="$ROBOT" --config.total_steps="$LAQ_STEPS"
echo "   reconstructions and the latent action atlas (what each code does): $OUT/laq/images/"

step "5/8 label every frame with its latent action and vision tokens"
lapa label --laq "$OUT/laq" --tokenizer "$OUT/tokenizer" --out "$OUT/labelled" --config.data.path="$ROBOT"

step "6/8 stage 2: latent pretraining on the labelled robot videos (their actions unused)"
lapa train configs/latent_pretrain.py:demo --workdir "$OUT/pretrain" \
  --config.data.path="$OUT/labelled/lapa_world_robot/1.0.0"

step "7/8 stage 3: action finetuning, from latent pretraining (LAPA) and from scratch (SCRATCH)"
lapa train configs/finetune.py:demo --workdir "$OUT/lapa" --config.data.path="$ROBOT" \
  --config.vision_tokenizer="$OUT/tokenizer" --config.init_from="$OUT/pretrain"
lapa train configs/finetune.py:demo,scratch --workdir "$OUT/scratch" --config.data.path="$ROBOT" \
  --config.vision_tokenizer="$OUT/tokenizer"

step "8/8 evaluate both: held-out metrics, closed-loop success in the world (same seeds), GIFs, imagined rollouts"
lapa evaluate "$OUT/lapa" "$OUT/scratch" "$OUT/pretrain" --out "$OUT/eval" --episodes "${DEMO_EVAL_EPISODES:-20}"
cat "$OUT/eval/results.md"
echo "   plot: $OUT/eval/success.png; rollouts: $OUT/eval/gifs/; the pretrained model's imagination: $OUT/eval/imagined/"
echo "   curves: tensorboard --logdir $OUT"

echo; echo "done: see $OUT/"
echo "serve the finetuned policy to robots running openpi-client:  lapa serve $OUT/lapa --port 8000"
