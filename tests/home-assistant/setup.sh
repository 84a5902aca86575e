#!/usr/bin/env bash
# Makes a venv with Home Assistant 2023.12.4 (a release that runs on Debian 12's Python 3.11;
# the last one for 3.11 is 2024.3) in a cache outside git, for the discovery test: check.py
# reads ternd's discovery messages with Home Assistant's own MQTT schemas and template engine.
# Its dependencies are pinned by constraints.txt (what pip resolved when the test was written),
# so a later release of one of them cannot change what the test runs. Prints the venv's Python
# last. Downloads only while the venv is missing, incomplete, or made from other pins.
#
#   TERN_HA_CACHE  cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/tern/home-assistant)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TERN_HA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/home-assistant}"
# The printed path is used from other directories.
case "$cache" in /*) ;; *) cache="$PWD/$cache" ;; esac
version="2023.12.4"
pin="homeassistant==$version"
venv="$cache/venv"
# What the venv was made from: the pin and the constraints.
stamp="$(printf '%s\n' "$pin" | cat - "$here/constraints.txt" | sha256sum | cut -d' ' -f1)"
mkdir -p "$cache"

works() {
  [ "$(cat "$venv/.tern-stamp" 2>/dev/null)" = "$stamp" ] &&
    [ "$("$venv/bin/python" -c 'import homeassistant.const as c; print(c.__version__)' 2>/dev/null)" = "$version" ] &&
    "$venv/bin/python" "$here/check.py" --self-check >/dev/null 2>&1
}

if [ ! -x "$venv/bin/python" ] || ! works; then
  echo "home-assistant: installing $pin into $venv" >&2
  rm -rf "$venv.new"
  python3 -m venv "$venv.new"
  "$venv.new/bin/pip" install --quiet --disable-pip-version-check \
    --constraint "$here/constraints.txt" "$pin"
  echo "$stamp" > "$venv.new/.tern-stamp"
  rm -rf "$venv"
  mv "$venv.new" "$venv"
  # A venv records its own path in its scripts; python itself runs from anywhere.
  works || { echo "home-assistant: $venv cannot read discovery messages" >&2; exit 1; }
fi
echo "$venv/bin/python"
