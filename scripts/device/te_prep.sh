#!/usr/bin/env bash
# Packs TransformerEngine 2.20.2 for the lent H200 (no package index there) into one carryable file, here.
#
#   scripts/device/te_prep.sh DEST      # DEST: a folder of the checkout that git ignores, carried to the device
#
# DEST gets te_site.tar.xz (~37 MB: an installed site folder, `site/`: TE's core wheel transformer_engine_cu13
# with its library pruned to sm_90, the transformer_engine meta wheel, pydantic and its three dependencies,
# nvidia-cudnn-frontend (C++ headers for the build), megatron-core 0.19.2, omegaconf 2.4) and the sdist
# transformer_engine_torch-2.20.2.tar.gz, which scripts/device/te_build.sh compiles there. The core wheel is
# 276 MB, 263 MB of it machine code for eight GPU architectures; prune_fatbin.py keeps the H200's (18 MB).
set -euo pipefail
DEST=${1:?usage: te_prep.sh DEST}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
TARGET=(--python-version 3.12 --implementation cp "${PLATFORMS[@]}" --only-binary=:all:)
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$WORK/whl" \
  transformer_engine_cu13==2.20.2 transformer_engine==2.20.2 nvidia-cudnn-frontend==1.32.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  megatron-core==0.19.2 omegaconf==2.4.0
# The sdist: pip download would run its setup.py (which needs torch) to read its metadata; fetch the file itself.
mkdir -p "$DEST" "$WORK/sdist"
url=$(curl -fsS https://pypi.org/simple/transformer-engine-torch/ \
      | grep -o 'https://[^"#]*transformer_engine_torch-2\.20\.2\.tar\.gz' | head -1)
curl -fsSL -o "$WORK/sdist/transformer_engine_torch-2.20.2.tar.gz" "$url"
echo "4c40ced8a6261649e689076f198d4feaf02277b1ba18931a66eccdaceb33c43e  $WORK/sdist/transformer_engine_torch-2.20.2.tar.gz" \
  | sha256sum -c --quiet
cp "$WORK/sdist/transformer_engine_torch-2.20.2.tar.gz" "$DEST/"
python3 -m pip install -q --no-deps --no-index --no-compile --ignore-requires-python "${TARGET[@]}" \
  --target "$WORK/site" "$WORK"/whl/*.whl
python3 "$HERE/prune_fatbin.py" "$WORK/site/transformer_engine/wheel_lib/libtransformer_engine.so" 90
tar -C "$WORK" -cf - site | xz -6 -T2 > "$DEST/te_site.tar.xz"
ls -l "$DEST"
