#!/usr/bin/env bash
# Installs whatever is missing, then runs the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${OTCCLIP_VENV:-$PWD/.venv}
exec "$VENV/bin/otcclip" demo "$@"
