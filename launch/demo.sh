#!/usr/bin/env bash
# The whole LAPA pipeline on the built-in tabletop world, on a CPU. Installs into .venv if needed.
# Outputs go to $DEMO_DIR (default demo_out/); re-running resumes finished steps.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="${DEMO_DIR:-demo_out}"
EPISODES="${DEMO_EPISODES:-200}"
LAQ_STEPS="${DEMO_LAQ_STEPS:-2000}"   # the demo preset's full schedule: ~15 min on 2 CPU cores (14.4 measured)
mkdir -p "$OUT"

step() { echo; echo "== $*"; }

step "1/3 built-in world: robot episodes (with actions) and human-hand episodes (video only)"
for emb in robot hand; do
  if [ -d "$OUT/data/lapa_world_$emb" ]; then
    echo "   $OUT/data/lapa_world_$emb exists, skipping"
  else
    lapa world --embodiment "$emb" --episodes "$EPISODES" --out "$OUT/data" --seed 0
  fi
done

step "2/3 inspect the data: frames, frame pairs (x_t | x_t+H) and action histograms as PNGs"
lapa inspect-data --data-dir "$OUT/data" --mixture lapa_world_robot,lapa_world_hand --out "$OUT/inspect"

step "3/3 stage 1: train the latent action quantizer on the robot episodes (resumes if interrupted)"
lapa train configs/laq.py:demo --workdir "$OUT/laq" \
  --config.data.path="$OUT/data/lapa_world_robot/1.0.0" --config.total_steps="$LAQ_STEPS"
echo "   reconstructions and the latent action atlas (what each code does): $OUT/laq/images/"
echo "   curves: tensorboard --logdir $OUT/laq/tensorboard"

echo; echo "done: see $OUT/"
