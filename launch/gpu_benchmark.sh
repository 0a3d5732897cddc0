#!/usr/bin/env bash
# Training-step speed on one GPU: ours against PyTorch, in one call of < 8 minutes.
#
#   bash launch/gpu_benchmark.sh [OUTPUT_DIR]
#
# For offseg_t, segformer_b0 and segnext_t (ADE20K configs, 150 classes) at
# global batch 16, 512x512, in float32 and bfloat16: our jitted training step
# and whole-image forward (median of STEPS timed steps, images/s, peak device
# memory), each model in its own process. For segformer_b0 the same process
# then times Hugging Face transformers' PyTorch SegFormer-B0, eager and under
# torch.compile, at the same settings (bfloat16 = torch.autocast), and prints
# the ratios. One JSON file per run goes to OUTPUT_DIR (default $OUT, else
# /tmp/gpu_benchmark); the last lines print a summary table.
#
# Needs the toolkit and the `compare` extra: `pip install -e .[compare]`. On a
# machine without network, point WHEELS at a folder of wheels and they are
# installed from there first. Settings can be changed through the environment:
# BATCH (16), SIZE (512), STEPS (10), WARMUP (2), DTYPES ("float32 bfloat16"),
# MODELS (the three above).
set -euo pipefail
cd "$(dirname "$0")/.."

OUTPUT_DIR=${1:-${OUT:-/tmp/gpu_benchmark}}
BATCH=${BATCH:-16}
SIZE=${SIZE:-512}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
DTYPES=${DTYPES:-"float32 bfloat16"}
MODELS=${MODELS:-"offseg_t segformer_b0 segnext_t"}
mkdir -p "$OUTPUT_DIR"

if [[ -n "${WHEELS:-}" ]]; then
  python -m pip install -q --no-index --find-links "$WHEELS" -e ".[compare]"
fi

config_of() {
  case "$1" in
    offseg_t) echo "experiments/configs/offseg.py:t,ade20k" ;;
    segformer_b0) echo "experiments/configs/segformer_ol.py:b0,ade20k" ;;
    segnext_t) echo "experiments/configs/segnext_ol.py:t,ade20k" ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for model in $MODELS; do
  for dtype in $DTYPES; do
    compare=()
    [[ "$model" == segformer_b0 ]] && compare=(--compare=torch)
    echo "=== $model $dtype"
    python -m offseg_jax.tools.benchmark --config="$(config_of "$model")" \
        --batch="$BATCH" --size="$SIZE,$SIZE" --steps="$STEPS" --warmup="$WARMUP" \
        --dtype="$dtype" --modes=train,whole "${compare[@]}" \
        --output="$OUTPUT_DIR/${model}_${dtype}.json" > "$OUTPUT_DIR/${model}_${dtype}.log" 2>&1 \
      || { echo "failed: see $OUTPUT_DIR/${model}_${dtype}.log"; tail -5 "$OUTPUT_DIR/${model}_${dtype}.log"; continue; }
    grep -E "^(train|whole|\|)" "$OUTPUT_DIR/${model}_${dtype}.log" || true
  done
done

python - "$OUTPUT_DIR" <<'EOF'
import glob, json, os, sys
print("| model | dtype | train img/s | peak GiB | forward img/s | PyTorch eager train | "
      "torch.compile train |")
print("|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  r = json.load(open(path))
  peak = r["train"].get("peak_memory_bytes")
  cells = [r["model"], r["dtype"], f"{r['train']['images_per_s']:.1f}",
           f"{peak / 2**30:.2f}" if peak else "-", f"{r['whole']['images_per_s']:.1f}"]
  for name in ("eager", "compiled"):     # ratio = PyTorch time / ours (> 1: ours faster)
    t = r.get("torch", {}).get(name)
    cells.append(f"{t['train']['images_per_s']:.1f} img/s (ratio {t['train']['ratio']:.2f}x)"
                 if t else "-")
  print("| " + " | ".join(cells) + " |")
EOF
