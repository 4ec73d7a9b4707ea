#!/usr/bin/env bash
# Issue 15's GPU figures in one call of a lent GPU machine (one H100 or H200), inside its budget.
#
#   bash bench/gpu_session.sh --fetch-wheels   # here, first: the wheels the GPU image lacks
#   bash bench/gpu_session.sh                  # there, in one call: carry .whl, timeout ≥ 600 s
#   bash bench/gpu_session.sh --smoke          # anywhere: the same flow on the CPU, tiny model
#
# Why a script: a session gets about 15 minutes of GPU time, starts included, so the whole
# measurement is one prepared call. The GPU image holds JAX, Flax, optax, orbax and PyTorch
# but neither TensorFlow nor ml_collections: the step (sface_jax/step.py) and the benchmark
# import without TensorFlow, and ml_collections travels as a wheel in .whl (git-ignored).
#
# Rows, most wanted first, each its own `bench/train_step.py` process under its own time
# limit, so that a row's peak memory is its own and a slow row cannot eat the rest: IR-50 +
# ArcFace over 85,742 classes in bf16 at batch 256 (the issue's target, also traced) and 128,
# then IR-50 + SFace, IR-18 and MobileFaceNet + ArcFace at 256. No row starts with
# under MIN_ROW_SECONDS of BUDGET_SECONDS left. Everything lands in $OUT (else
# /tmp/gpu_session): session.log (all output), table.md (the rows), profile.tar.gz (the
# JAX trace and compiled step, when under 16 MiB; TensorBoard's profile plugin reads it).
# Exits 1 if any row failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

if [[ "${1:-}" == --fetch-wheels ]]; then
  grep -qxF '/.whl/' .gitignore || { echo '.whl/ is not git-ignored' >&2; exit 2; }
  exec python3 -m pip download --no-deps --only-binary=:all: -d .whl 'ml-collections==1.1.0'
fi

OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
start=$SECONDS
if [[ "${1:-}" == --smoke ]]; then
  budget=${BUDGET_SECONDS:-600}
  common=(--device cpu --dtype float32 --num-classes 16 --image-size 32 --steps 1 --windows 1
          --max-warmup 1)
  rows=('tiny arcface 8' 'tiny sface 8 profile')
  python3 -c 'import torch' 2>/dev/null || common+=(--no-torch)
else
  budget=${BUDGET_SECONDS:-540}
  common=(--device gpu --dtype bfloat16 --num-classes 85742 --steps 10 --windows 5
          --warmup 2 --max-warmup 3 --profile-steps 3)
  rows=('r50 arcface 256 profile' 'r50 arcface 128' 'r50 sface 256' 'r18 arcface 256'
        'mbf arcface 256')
fi
row_limit=${ROW_SECONDS:-240}
min_row=${MIN_ROW_SECONDS:-60}

if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sface_site .whl/*.whl || { echo 'ml_collections missing: run --fetch-wheels here and carry .whl' >&2; exit 2; }
  export PYTHONPATH="/tmp/sface_site${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== $(date -u '+%F %T') UTC, $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as metadata
import jax
names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'torch')
versions = []
for name in names:
  try:
    versions.append(f'{name} {metadata.version(name)}')
  except metadata.PackageNotFoundError:
    versions.append(f'{name} absent')
print(', '.join(versions))
print('devices:', jax.devices())
EOF

table="$OUT/table.md"
: > "$table"
failed=0
for row in "${rows[@]}"; do
  read -r model head batch profile <<< "$row"
  left=$((budget - (SECONDS - start)))
  if ((left < min_row)); then
    echo "== skipped: $row ($left s of the budget left)"
    continue
  fi
  limit=$((left < row_limit ? left : row_limit))
  args=("${common[@]}" --models "$model" --heads "$head" --batch "$batch")
  [[ -n "$profile" ]] && args+=(--profile "$OUT/profile")
  echo "== $row: python3 bench/train_step.py ${args[*]}  (at most $limit s)"
  log="$(mktemp)"
  timeout --kill-after=10 "$limit" python3 bench/train_step.py "${args[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  if ((status != 0)); then
    echo "== $row ended with status $status$( ((status == 124)) && echo ' (time limit)')"
    failed=$((failed + 1))
  fi
  # the closing table of the row: its header and rule once, then the row itself
  [[ -s "$table" ]] || grep -m2 '^| model \|^|---' "$log" >> "$table"
  grep "^| $model | $head | $batch |" "$log" | tail -1 >> "$table"
  rm -f "$log"
done

if [[ -d "$OUT/profile" ]]; then
  tar czf "$OUT/profile.tar.gz" -C "$OUT" profile && rm -rf "$OUT/profile"
  size=$(stat -c %s "$OUT/profile.tar.gz")
  if ((size > 16 * 2**20)); then
    echo "== profile.tar.gz is $((size >> 20)) MiB, over what comes back: removed (its summary is above)"
    rm -f "$OUT/profile.tar.gz"
  fi
fi
echo "== done in $((SECONDS - start)) s, $failed row(s) failed; the rows:"
cat "$table"
exit $((failed > 0))
