#!/usr/bin/env bash
# One command for the GPU figures: the heads and the large-class losses on the JAX backend, as ratios to the
# GPU's own matmul floor, with steps per second.
#
#   benchmarks/gpu.sh            build the wheels if benchmarks/.gpu-wheels is missing (needs the package index),
#                                install them into a fresh virtual environment that sees the machine's own JAX
#                                (a GPU image brings jax with its CUDA plugin), run.
#   benchmarks/gpu.sh build      only build the wheels (on a machine that reaches the index), for a GPU machine
#                                that reaches nothing: copy benchmarks/.gpu-wheels along with the tree.
#   benchmarks/gpu.sh run        only install from benchmarks/.gpu-wheels (offline) and run.
#
# The wheels: keras-margin itself (no dependencies: TensorFlow is not needed on the JAX backend) and Keras with
# what it needs, when the machine's Keras is not the tested one. Budget: under 5 minutes on one GPU.
# Environment: GPU_HEADS_ARGS / GPU_LARGE_ARGS / GPU_PFC_ARGS replace the default arguments of each benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS="$ROOT/benchmarks/.gpu-wheels"
VENV="${GPU_VENV:-/tmp/keras-margin-gpu-venv}"
KERAS_SPEC="keras>=3.15,<3.16"
PYTHON="${PYTHON:-python3}"
mode="${1:-all}"

build() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "$ROOT"
    # Keras and its pure-Python / manylinux dependencies, for the machine's Python (cp311 by default).
    "$PYTHON" -m pip download -q -d "$WHEELS" --only-binary=:all: \
        --python-version "${GPU_PYTHON_VERSION:-3.11}" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$KERAS_SPEC"
    echo "gpu.sh: wheels in $WHEELS:" && ls "$WHEELS"
}

run() {
    [ -d "$WHEELS" ] || { echo "gpu.sh: no $WHEELS; run 'benchmarks/gpu.sh build' where the index is reachable" >&2; exit 2; }
    "$PYTHON" -c "import jax" 2>/dev/null || { echo "gpu.sh: this Python has no jax; a GPU image brings it" >&2; exit 2; }
    "$PYTHON" -m venv --clear "$VENV"
    # The new environment sees every package of $PYTHON (its jax, CUDA plugin included), whether $PYTHON is the
    # system's or itself a virtual environment's, through a .pth file of $PYTHON's site-packages folders.
    "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" \
        >"$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_gpu_base.pth"
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false
    if ! python -c "import keras, sys; v = tuple(map(int, keras.__version__.split('.')[:2])); sys.exit(v != (3, 15))" \
        2>/dev/null; then
        python -m pip install -q --no-index --find-links "$WHEELS" "$KERAS_SPEC"
    fi
    python -m pip install -q --no-index --no-deps --find-links "$WHEELS" keras-margin
    cd /tmp  # import the installed wheel, not the source tree
    python - <<'EOF'
import jax, keras, keras_margin
print(f"gpu.sh: jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), keras "
      f"{keras.__version__}, keras-margin {keras_margin.__version__}")
EOF
    started=$(date +%s)
    # shellcheck disable=SC2086
    python "$ROOT/benchmarks/heads.py" --backend jax ${GPU_HEADS_ARGS:---jit on --reps 20 --warmup 3}
    # shellcheck disable=SC2086
    python "$ROOT/benchmarks/large_classes.py" ${GPU_LARGE_ARGS:---million}
    # Partial FC's two update rules (PartialFC_V2 and v1) with Keras' SGD momentum, against the dense step.
    # shellcheck disable=SC2086
    python "$ROOT/benchmarks/large_classes.py" ${GPU_PFC_ARGS:---classes 85742,1000000 --paths dense,sampled,sampled-v1,sampled-v1-dense --optimizer momentum}
    echo "gpu.sh: done in $(( $(date +%s) - started )) s (steps per second = 1000 / the ms columns)"
}

case "$mode" in
    build) build ;;
    run) run ;;
    all) [ -d "$WHEELS" ] || build; run ;;
    *) echo "usage: benchmarks/gpu.sh [build|run]" >&2; exit 2 ;;
esac
