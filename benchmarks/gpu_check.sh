#!/usr/bin/env bash
# The GPU check: on one H100 or H200, in under 8 minutes,
#   1. backbone MFU in bf16 at the `1b` preset (benchmarks/backbone_step.py, batch 32 x 384: LAPA's
#      per-GPU share of its global batch 256 on 8 GPUs),
#   2. the LAQ `paper` train step at 64 pairs per GPU, the official run's per-GPU batch (benchmarks/laq_step.py),
#   3. the labelling job's frames/s against the bare jitted encoders (benchmarks/label.py),
# then what the paper's Open-X latent pretraining (70k steps x batch 256 x ~300 tokens on LWM-7B) would
# take on 8 such GPUs at the measured MFU, next to the paper's 8 x H100 x 34 h.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; JSON lines go to $OUT (/tmp/lapa_gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: prints the commands, runs the projection on an example
#
# Installs nothing from the network beyond what `bash launch/test.sh` installs plus jax[cuda12] at the jax
# version pinned in requirements.txt: launch/_venv.sh makes .venv from requirements.txt (a subset of the
# test venv; nothing if .venv is current), then `pip install jax[cuda12]==<pin>` if its CUDA plugin is missing.
# PEAK_TFLOPS (default 989: dense bf16 of an H100 SXM, the same for an H200) is the peak MFU is taken against.
# Each step has a time limit (they add up to 8 minutes, the install not counted); one that fails or runs
# out of time is reported and the others still run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/lapa_gpu_check}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
cd "$ROOT"

if (( DRY_RUN )); then
  PYTHON="$ROOT/.venv/bin/python"; [ -x "$PYTHON" ] || PYTHON=python3
else
  # shellcheck disable=SC1091
  source "$ROOT/launch/_venv.sh"
  PYTHON=python
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  if ! python -c 'import jax_cuda12_plugin' 2>/dev/null; then
    echo "== installing jax[cuda12]==$jax_version" >&2
    python -m pip install -q "jax[cuda12]==$jax_version"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
# On the GPU or not at all: backbone_step.py would otherwise fall back to the CPU.
export JAX_PLATFORMS=cuda

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its JSON lines into $OUT/NAME.jsonl
  local name=$1 seconds=$2; shift 2
  echo "== $name (at most ${seconds} s): JAX_PLATFORMS=cuda $*" >&2
  (( DRY_RUN )) && return 0
  local start=$SECONDS
  timeout "$seconds" "$@" | tee "$OUT/$name.jsonl" || echo "== $name FAILED or timed out (exit $?)" >&2
  echo "== $name: $((SECONDS - start)) s" >&2
}

step backbone 210 "$PYTHON" benchmarks/backbone_step.py --preset 1b --batch 32 --length 384 --steps 10 \
  --dtype bfloat16 --peak-tflops "$PEAK_TFLOPS" --matmul-size 8192
step laq_paper 120 "$PYTHON" benchmarks/laq_step.py --preset paper --batch 64 --steps 10
step label 150 "$PYTHON" benchmarks/label.py

backbone="$OUT/backbone.jsonl"
if (( DRY_RUN )); then  # an example line, so that the projection below is checked on any machine
  backbone="$OUT/backbone_example.jsonl"
  echo '{"benchmark": "backbone_step", "model": "vla", "preset": "1b", "mfu": 0.4, "example": true}' > "$backbone"
  echo "== dry run: the projection of an EXAMPLE MFU of 0.4, not a measurement" >&2
fi
[ -s "$backbone" ] || { echo "== no backbone figures: no projection" >&2; exit 1; }
PEAK_TFLOPS="$PEAK_TFLOPS" "$PYTHON" - "$backbone" <<'EOF' | tee "$OUT/projection.jsonl"
import json, os, sys

peak = float(os.environ['PEAK_TFLOPS']) * 1e12
lines = [json.loads(line) for line in open(sys.argv[1]) if line.startswith('{')]
mfu = {f"{line['preset']} {line['model']}": line['mfu'] for line in lines
       if line.get('benchmark') == 'backbone_step' and 'mfu' in line}
# LAPA on Open-X (reference/official_lapa.md section 4): 70k steps x global batch 256 x ~300 real tokens
# (padded to 384, which the GPUs compute too) on LWM-7B, N ~ 6.8e9 params (LLaMA-2-7B + vision embeddings),
# 8 x H100 (989 TFLOP/s dense bf16) in 34 h.
params, steps, batch, gpus, paper_hours, h100_peak = 6.8e9, 70_000, 256, 8, 34, 989e12
for tokens_per_sequence in (300, 384):
  flops = 6 * params * steps * batch * tokens_per_sequence
  implied = flops / (gpus * h100_peak * paper_hours * 3600)
  for step, value in mfu.items():
    hours = flops / (gpus * peak * value) / 3600
    print(json.dumps(dict(projection='openx_latent_pretraining', tokens_per_sequence=tokens_per_sequence,
                          mfu_from=f'{step} step', mfu=value, gpus=gpus, peak_tflops=peak / 1e12,
                          hours=round(hours, 1), paper_hours=paper_hours, paper_implied_mfu=round(implied, 3))))
    print(f'{tokens_per_sequence} tokens/sequence at the MFU of the {step} step ({value:.3f}): {hours:.1f} h on '
          f'{gpus} GPUs; the paper: {paper_hours} h on 8 x H100, an MFU of {implied:.3f} by the same count',
          file=sys.stderr)
EOF
echo "== JSON lines in $OUT" >&2
