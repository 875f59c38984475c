#!/usr/bin/env bash
# The accelerator run: the optimizer-step, trace + compile and whole-training-
# step sections of benchmarks/run.py, in one process, one results file.
#
#   benchmarks/gpu.sh              # full sizes, 2 compile rounds (a few minutes on one GPU)
#   benchmarks/gpu.sh --quick      # smoke run (also on a CPU)
#   OUT=/somewhere benchmarks/gpu.sh
#
# Assumes a copy of this repository and a Python whose jax sees the
# accelerator; nothing is downloaded (the machine may be offline). Python:
# $PYTHON, else the repository's .venv/bin/python if there is one, else
# python3. It needs optax and flax (keras is optional: the Keras rows are
# skipped without it); where they are missing, WHEELS=<folder> names a folder
# of wheels carried along (made where there is a network with
# `pip download optax chex flax ... -d <folder> --no-deps`), installed
# offline into a temporary folder on PYTHONPATH. optax_constraints itself is
# imported from this repository (run.py puts it first on the path).
# Results: $OUT if set, else benchmarks/results/ (<machine>-<date>-step-compile-whole_step.json).
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
echo "python: $py"
if ! "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"; then
  echo "gpu.sh: $py cannot import jax; set PYTHON to a Python whose jax sees the GPU" >&2
  exit 2
fi
if ! "$py" -c "import optax, flax" 2>/dev/null; then
  if [ -z "${WHEELS:-}" ]; then
    echo "gpu.sh: optax and flax are not importable; set WHEELS to a folder of their wheels" >&2
    exit 2
  fi
  site="$(mktemp -d)"
  "$py" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import optax, flax"
fi
if [ "$("$py" -c 'import jax; print(jax.default_backend())')" = cpu ]; then
  echo "gpu.sh: warning: jax sees no accelerator, these are CPU figures" >&2
fi

export KERAS_BACKEND=jax
out="${OUT:-benchmarks/results}"
rounds=(--rounds 2)
for arg in "$@"; do [ "$arg" = --quick ] && rounds=(); done
exec "$py" benchmarks/run.py --only step,compile,whole_step "${rounds[@]}" --out "$out" "$@"
