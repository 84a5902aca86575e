#!/usr/bin/env bash
# Builds tern model packages (format 2) from third-party ONNX models shipped in PyPI wheels,
# plus test data for them, in a cache outside git:
#
#   packages/ppocr-det   PP-OCRv4 text detector         (rapidocr-onnxruntime 1.4.4)
#   packages/ppocr-cls   PP-OCR v2.0 0/180 classifier   (rapidocr-onnxruntime 1.4.4)
#   packages/ppocr-cls-int8  the same, quantised to int8 (QDQ) here with onnxruntime's tools
#   packages/ppocr-rec   PP-OCRv4 text recogniser       (rapidocr-onnxruntime 1.4.4)
#   packages/silero-vad  Silero VAD, op18 if-less graph (silero-vad 6.2.3)
#   testdata/            words/*.png + words.tsv, page.png + page.json, speech.wav + speech.json
#   python               the path of the Python (with numpy, onnxruntime and onnx) it used
#   onnxruntime-library  that onnxruntime's libonnxruntime.so (for ternd's onnxruntime plan)
#
# Usage: tests/models/fetch-third-party.sh        (prints the packages directory last; links
#   tests/models/third-party to the cache for the demo configurations)
#   TERN_THIRD_PARTY_CACHE  cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/tern/third-party)
#
# Needs (Debian): python3 python3-venv python3-pip espeak-ng fonts-dejavu-core. If python3
# cannot import numpy, onnxruntime, onnx and Pillow >= 10.1, a venv is made in $CACHE/venv with
# pinned versions. Downloads happen only while the wheels or the venv are missing; after that
# the script runs offline. The packages and test data are rebuilt on every run (same bytes),
# each directory written beside its place and renamed into it. The work is done by
# third_party.py next to this script, which also checks what it builds (see there).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TERN_THIRD_PARTY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/third-party}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

pins=(onnxruntime==1.32.0 numpy==2.4.6 pillow==12.0.0 onnx==1.23.2)
wheel_reqs=(rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3)
wheel_files=(rapidocr_onnxruntime-1.4.4-py3-none-any.whl silero_vad-6.2.3-py3-none-any.whl)

log() { echo "fetch-third-party: $*" >&2; }

has_deps() {
  "$1" - >/dev/null 2>&1 <<'EOF'
import numpy, onnxruntime, onnx, PIL
assert tuple(int(p) for p in PIL.__version__.split(".")[:2]) >= (10, 1)
EOF
}

# 1. A Python with numpy, onnxruntime, onnx (to quantise) and Pillow >= 10.1.
command -v python3 >/dev/null || { log "python3 is missing (apt-get install python3 python3-venv python3-pip)"; exit 1; }
venv="$cache/venv"
if has_deps python3; then
  py=python3
elif [[ -e "$venv/.tern-complete" ]] && has_deps "$venv/bin/python"; then
  py="$venv/bin/python"
else
  log "python3 lacks numpy/onnxruntime/onnx/Pillow>=10.1: making $venv with ${pins[*]}"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "${pins[@]}" >&2
  has_deps "$venv/bin/python" || { log "the venv still cannot import numpy, onnxruntime, onnx, PIL"; exit 1; }
  touch "$venv/.tern-complete"
  py="$venv/bin/python"
fi
py_path="$("$py" -c 'import sys; print(sys.executable)')"
log "using $py_path"
# Tests that run onnxruntime themselves (tern-update package golden) use the same Python.
printf '%s\n' "$py_path" > "$cache/python.tmp" && mv -f "$cache/python.tmp" "$cache/python"
# ternd's onnxruntime plan loads this same library (ORT_DYLIB_PATH).
"$py" -c 'import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
print(libs[-1] if libs else "")' > "$cache/onnxruntime-library.tmp"
mv -f "$cache/onnxruntime-library.tmp" "$cache/onnxruntime-library"

# 2. The wheels, by exact version (their sha256 is checked by third_party.py).
wheels="$cache/wheels"
mkdir -p "$wheels"
missing=()
for i in "${!wheel_files[@]}"; do
  [[ -f "$wheels/${wheel_files[$i]}" ]] || missing+=("${wheel_reqs[$i]}")
done
if ((${#missing[@]})); then
  log "downloading ${missing[*]}"
  "$py" -m pip --version >/dev/null 2>&1 || { log "$py has no pip (apt-get install python3-pip)"; exit 1; }
  partial="$wheels/.partial"
  rm -rf "$partial"
  "$py" -m pip download --disable-pip-version-check --no-input --no-deps --only-binary=:all: \
    -d "$partial" "${missing[@]}" >&2
  for f in "${wheel_files[@]}"; do
    if [[ -f "$partial/$f" ]]; then mv -f "$partial/$f" "$wheels/$f"; fi
  done
  rm -rf "$partial"
fi
for f in "${wheel_files[@]}"; do
  [[ -f "$wheels/$f" ]] || { log "pip did not produce $wheels/$f"; exit 1; }
done

# 3. Packages and test data (all progress and figures on stderr).
"$py" "$here/third_party.py" "$cache" >&2

# The demos (configs/ocr-demo.toml, configs/vad-demo.toml) find the cache through this link.
ln -sfn "$cache" "$here/third-party"

echo "$cache/packages"
