#!/usr/bin/env bash
# Makes a venv with Home Assistant 2023.12.4 (the last release that runs on Debian 12's Python
# 3.11) in a cache outside git, for the discovery test: check.py reads ternd's discovery
# messages with Home Assistant's own MQTT schemas and template engine. Prints the venv's Python
# last. Downloads only while the venv is missing or incomplete.
#
#   TERN_HA_CACHE  cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/tern/home-assistant)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TERN_HA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/home-assistant}"
pin="homeassistant==2023.12.4"
venv="$cache/venv"
mkdir -p "$cache"

works() { "$venv/bin/python" "$here/check.py" --self-check >/dev/null 2>&1; }

if [ ! -x "$venv/bin/python" ] || ! works; then
  echo "home-assistant: installing $pin into $venv" >&2
  rm -rf "$venv.new"
  python3 -m venv "$venv.new"
  "$venv.new/bin/pip" install --quiet --disable-pip-version-check "$pin"
  rm -rf "$venv"
  mv "$venv.new" "$venv"
  # A venv records its own path in its scripts; python itself runs from anywhere.
  works || { echo "home-assistant: $venv cannot read discovery messages" >&2; exit 1; }
fi
echo "$venv/bin/python"
