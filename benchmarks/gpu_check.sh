#!/usr/bin/env bash
# The GPU check as the device machine runs it (benchmarks/RESULTS.md, "GPU check"): installs clipdalle on that
# machine's own PyTorch from the wheels that benchmarks/gpu_wheels.sh put in .whl/ (the machine has no network),
# then runs benchmarks/gpu_check.py. Everything it measures lands in $OUT: results.json, summary.md, gpu_check.log.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]                 # the GPU machine: python3, --device cuda
#   PYTHON=/tmp/venv/bin/python bash benchmarks/gpu_check.sh --device cpu --tiny   # a dry run on a CPU
#
# The driver ends its sections within --budget (300 s); GPU_CHECK_TIMEOUT (390 s) stops it whatever it is doing,
# and every section finished by then is already in $OUT. PYTHON is the interpreter to install into and run (the
# machine's python3 by default): point it at a throwaway venv for a dry run, never at a shared one.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu-check}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check}"  # hatchling for the build, and the reference packages (theirs)
rm -rf "$SITE"
mkdir -p "$OUT" "$SITE"

install() {
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --root-user-action=ignore "$@"
}

main() {
  echo "gpu_check.sh $(date -u +%FT%TZ): $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ -d .whl ] || echo ".whl/ is missing: run 'bash benchmarks/gpu_wheels.sh' here and carry .whl to the device"

  # Ours: clipdalle editable on this python's torch, plus the two pure-Python packages the image lacks.
  if install .whl/ours/*.whl && install --target "$SITE/build" .whl/build/*.whl &&
    PYTHONPATH="$SITE/build" install --no-build-isolation -e .; then
    echo "installed: pip install --no-deps -e . (and ftfy, wcwidth)"
  else
    echo "pip install -e . failed: clipdalle runs from src/ through PYTHONPATH instead"
    install --target "$SITE/ours" .whl/ours/*.whl
    export PYTHONPATH="$PWD/src:$SITE/ours${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c "import clipdalle, torch; print('clipdalle', clipdalle.__file__, '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, torch.cuda.is_available())" || return 1

  # Theirs: DALLE-pytorch and open_clip in a folder of their own, on sys.path only for the reference sections.
  local reference=()
  if install --target "$SITE/reference" .whl/reference/*.whl && cp -r .whl/reference-stubs/. "$SITE/reference/"; then
    reference=(--reference-site "$SITE/reference")
  else
    echo "the reference packages did not install: the ref_* sections will say so and be skipped"
  fi

  PYTHONUNBUFFERED=1 NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
    timeout -s INT -k 15 "${GPU_CHECK_TIMEOUT:-390}" \
    "$PYTHON" benchmarks/gpu_check.py --out "$OUT" ${reference[@]+"${reference[@]}"} "$@"
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
