#!/usr/bin/env bash
# The whole LAPA pipeline on the built-in tabletop world, on a CPU. Installs into .venv if needed.
# Outputs go to $DEMO_DIR (default demo_out/); re-running resumes finished steps.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="${DEMO_DIR:-demo_out}"
EPISODES="${DEMO_EPISODES:-200}"
mkdir -p "$OUT"

step() { echo; echo "== $*"; }

step "1/2 built-in world: robot episodes (with actions) and human-hand episodes (video only)"
for emb in robot hand; do
  if [ -d "$OUT/data/lapa_world_$emb" ]; then
    echo "   $OUT/data/lapa_world_$emb exists, skipping"
  else
    lapa world --embodiment "$emb" --episodes "$EPISODES" --out "$OUT/data" --seed 0
  fi
done

step "2/2 inspect the data: frames, frame pairs (x_t | x_t+H) and action histograms as PNGs"
lapa inspect-data --data-dir "$OUT/data" --mixture lapa_world_robot,lapa_world_hand --out "$OUT/inspect"

echo; echo "done: see $OUT/"
