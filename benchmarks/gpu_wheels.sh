#!/usr/bin/env bash
# Fills .whl/ (ignored by git; about 6 MB) with what the GPU machine lacks for benchmarks/gpu_check.sh. That machine
# reaches no network: its python3 (3.12, with PyTorch, numpy, pillow, safetensors, tokenizers, tqdm, matplotlib,
# regex, pytest, einops, torchvision, timm, huggingface_hub) gets these as wheels, carried with the device tool's
# `carry: [".whl"]`. Run it here, where PyPI answers:   bash benchmarks/gpu_wheels.sh
#
#   .whl/ours/         ftfy + wcwidth (clipdalle's CLIP text cleaning)
#   .whl/build/        hatchling and its needs (editables for its editable wheels): `pip install --no-deps --no-build-isolation -e .` offline
#   .whl/reference/    DALLE-pytorch 1.6.6, its rotary and axial embeddings, open_clip 3.3.0, einops >= 0.8 (theirs
#                      need it), setuptools < 81 (dalle_pytorch imports pkg_resources)
#   .whl/reference-stubs/   taming and omegaconf: dalle_pytorch imports them at import time for its VQGAN wrapper,
#                      which nothing here runs; the real taming needs pytorch-lightning < 1.9, which does not import
#                      on Python 3.12. Each stub raises if used.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
W=.whl
rm -rf "$W"
mkdir -p "$W/ours" "$W/build" "$W/reference" "$W/reference-stubs/taming/models"
download() {  # folder, requirements...: pure-Python wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local folder=$1
  shift
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$folder" "$@"
}
download "$W/ours" ftfy==6.3.1 wcwidth==0.2.13
download "$W/build" hatchling==1.33.0 trove-classifiers==2026.9.21.13 tomlkit==0.13.3 packaging==26.4 \
  pathspec==1.1.1 pluggy==1.7.0 editables==0.5
download "$W/reference" dalle-pytorch==1.6.6 rotary-embedding-torch==0.9.1 axial-positional-embedding==0.3.12 \
  open_clip_torch==3.3.0 einops==0.8.2 setuptools==80.9.0

stub='raise ImportError("a stub from benchmarks/gpu_wheels.sh: the GPU check never runs DALLE-pytorch'"'"'s VQGAN")'
cat >"$W/reference-stubs/taming/__init__.py" <<EOF
"""Stub of taming-transformers for benchmarks/gpu_check.py: dalle_pytorch imports it, nothing here uses it."""
EOF
cp "$W/reference-stubs/taming/__init__.py" "$W/reference-stubs/taming/models/__init__.py"
cat >"$W/reference-stubs/taming/models/vqgan.py" <<EOF
"""Stub: dalle_pytorch.vae imports these names for VQGanVAE, which the GPU check never builds."""


class VQModel:
    def __init__(self, *args, **kwargs):
        $stub


class GumbelVQ(VQModel):
    pass
EOF
cat >"$W/reference-stubs/omegaconf.py" <<EOF
"""Stub: dalle_pytorch.vae imports OmegaConf for VQGanVAE, which the GPU check never builds."""


class OmegaConf:
    @staticmethod
    def load(*args, **kwargs):
        $stub
EOF
du -sh "$W"
find "$W" -type f | sort
