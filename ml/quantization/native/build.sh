#!/usr/bin/env bash
# Builds Retrainer's ONNX Runtime custom operators (ortops.c) into the shared library given as $1
# (default: libretrainer_ortops.so beside this script), which ml/quantization/kernels.py loads.
#
# Needs a C compiler (gcc or cc) and ONNX Runtime's C API header. The header is not in the
# onnxruntime wheel; it is taken from $ORT_C_API_HEADER_DIR when set, else from a pinned Go module
# that ships it (github.com/yalue/onnxruntime_go, fetched with `go mod download`, checked by Go's
# checksum database and by the sha256 below). Only API version 17 (ONNX Runtime 1.17) is used, so
# a newer header than the runtime's works, and so does a newer runtime.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/libretrainer_ortops.so}"
HEADER_MODULE=github.com/yalue/onnxruntime_go@v1.27.0  # its onnxruntime_c_api.h: ONNX Runtime 1.24's (API 24)
HEADER_SHA256=9ed0d7054a4e74249467365b25b415d36f51a44a6349e2a994a1812e4723d1e2

die() { echo "ortops: $*" >&2; exit 1; }

header_dir="${ORT_C_API_HEADER_DIR:-}"
if [[ -z "$header_dir" ]]; then
  command -v go >/dev/null || die "needs ONNX Runtime's C API header: install Go (to fetch $HEADER_MODULE) or set ORT_C_API_HEADER_DIR to a folder holding onnxruntime_c_api.h"
  header_dir="$(GOFLAGS=-mod=mod go mod download -json "$HEADER_MODULE" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$header_dir" ]] || die "go mod download $HEADER_MODULE gave no folder"
  echo "$HEADER_SHA256  $header_dir/onnxruntime_c_api.h" | sha256sum --check --status \
    || die "$header_dir/onnxruntime_c_api.h does not have the pinned sha256 $HEADER_SHA256"
fi
[[ -f "$header_dir/onnxruntime_c_api.h" ]] || die "no onnxruntime_c_api.h in $header_dir (ORT_C_API_HEADER_DIR)"
cc="${CC:-$(command -v gcc || command -v cc || true)}"
[[ -n "$cc" ]] || die "needs a C compiler (gcc): apt-get install gcc"

# -fopenmp-simd: the `omp simd` loops vectorize (no OpenMP runtime); -fno-math-errno: sqrtf inline.
mkdir -p "$(dirname "$out")"
"$cc" -std=c11 -O3 -fopenmp-simd -fno-math-errno -fPIC -shared -fvisibility=hidden -Wall -Wextra -Werror -pthread \
  -I"$header_dir" "$here/ortops.c" -o "$out.tmp" -lm
mv "$out.tmp" "$out"
echo "ortops: built $out"
