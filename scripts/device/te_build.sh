#!/usr/bin/env bash
# On the lent H200: TransformerEngine 2.20.2 for the image's torch (2.11+cu130), from what te_prep.sh packed.
#
#   bash scripts/device/te_build.sh XFER && . /tmp/te_env.sh
#
# XFER (carried) holds te_site.tar.xz and the sdist transformer_engine_torch-2.20.2.tar.gz. The site folder is
# unpacked to /tmp/site; the sdist's torch extension (33 C++ files, no CUDA sources: the kernels are in the core
# library) is compiled there with pip --no-build-isolation and installed into /tmp/site, and packed as
# $OUT/te_torch_ext.tar.xz when OUT is set. A later fresh machine given that file in XFER unpacks it instead of
# compiling. The extension's headers come from the core (the sdist's copy), cuDNN and NCCL (the image's nvidia
# wheels) and cudnn-frontend (/tmp/site/include). /tmp/te_env.sh sets PYTHONPATH, LD_LIBRARY_PATH and the
# library homes TE searches (below). Seen on the H200: the extension compiles in 96 s with 16 jobs.
set -euo pipefail
XFER=${1:?usage: te_build.sh XFER}
SITE=/tmp/site
python3 -W ignore::DeprecationWarning -m tarfile -e "$XFER/te_site.tar.xz" /tmp
NVIDIA=$(python3 -c 'import os, site; print(" ".join(d for d in site.getsitepackages() if os.path.isdir(d)))')
libs=$(find $NVIDIA -path '*nvidia*' -name lib -type d | paste -sd:)
# TE loads cuDNN, NVRTC and cuRAND itself, the system's copy first (*_HOME, CUDA_HOME, /usr/local/cuda, then
# the loader's path): here that is /usr/lib's libcudnn.so.9.14.0 beside the copy torch loaded, and its fused
# attention then fails with CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED (seen on the H200). Point TE at torch's.
root_of() { dirname "$(dirname "$(find $NVIDIA -path '*nvidia*' -name "$1" | head -1)")"; }
cat > /tmp/te_env.sh <<ENV
export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}
export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export CUDNN_HOME=$(root_of 'libcudnn.so.9') NVRTC_HOME=$(root_of 'libnvrtc.so.*') CURAND_HOME=$(root_of 'libcurand.so.*')
ENV
if [ -f "$XFER/te_torch_ext.tar.xz" ]; then
  python3 -W ignore::DeprecationWarning -m tarfile -e "$XFER/te_torch_ext.tar.xz" $SITE
else
  headers=$(find $NVIDIA -path '*nvidia*' \( -name cudnn.h -o -name nccl.h \) | xargs -n1 dirname \
            | sort -u | paste -sd:)
  start=$(date +%s)
  env PYTHONPATH=$SITE CPLUS_INCLUDE_PATH="$headers:$SITE/include" NVTE_FRAMEWORK=pytorch \
      NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 MAX_JOBS=16 \
      python3 -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target /tmp/te-torch \
      "$XFER/transformer_engine_torch-2.20.2.tar.gz"
  echo "te_build: the torch extension compiled in $(( $(date +%s) - start )) s"
  cp -r /tmp/te-torch/. $SITE/
  if [ -n "${OUT:-}" ]; then
    (cd /tmp/te-torch && tar -cf - . | xz -3 -T0 > "$OUT/te_torch_ext.tar.xz")
  fi
fi
. /tmp/te_env.sh
python3 -c 'import transformer_engine.pytorch as te, importlib.metadata as m; print("te_build: transformer_engine",
m.version("transformer_engine_torch"), "imports; cuDNN", te.cpp_extensions.fused_attn.tex.get_cudnn_version())'
