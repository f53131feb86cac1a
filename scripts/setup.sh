#!/usr/bin/env bash
# Installs whatever is missing, and nothing that is already there:
#   - Debian's dataset-fashion-mnist (the embedded default data), when run as root;
#   - a virtual environment ($OTCCLIP_VENV, default ./.venv) with the Python
#     dependencies of pyproject.toml (torch from PyPI is a few GB: it is installed
#     once and skipped afterwards, as long as pyproject.toml's dependencies are unchanged);
#   - the Rust extension otcclip._otmatch, built by maturin in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OTCCLIP_VENV:-$PWD/.venv}

FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "${OTCCLIP_FASHION_MNIST:-}" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "       or point OTCCLIP_FASHION_MNIST at a folder with the four IDX files" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.otcclip-deps"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the Python dependencies (torch is large; this happens once)"
  "$PY" -m pip install -q --retries 10 --upgrade pip
  "$PY" - > "$VENV/.otcclip-requirements.txt" <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"] + ["maturin>=1.9.4,<2"]
print("\n".join(reqs))
PYEOF
  # A few-GB download over a shared link breaks now and then: resume a broken
  # file, and start the whole install again (pip skips what it already has).
  resume=()
  if "$PY" -m pip install --help | grep -q -- --resume-retries; then resume=(--resume-retries 20); fi
  for attempt in 1 2 3 4; do
    if "$PY" -m pip install -q --retries 10 --timeout 60 "${resume[@]}" \
        -r "$VENV/.otcclip-requirements.txt"; then
      break
    fi
    if [ "$attempt" = 4 ]; then
      echo "setup: pip failed 4 times; check the network and run scripts/setup.sh again" >&2
      exit 1
    fi
    echo "setup: pip failed (attempt $attempt of 4); trying again in $((attempt * 15)) s" >&2
    sleep $((attempt * 15))
  done
  echo "$want" > "$stamp"
fi

echo "setup: building the extension (release)"
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release --quiet 2>&1 \
  | grep -v -E 'Requirement already satisfied|^Ignoring |^Looking in links' || true
"$PY" -c "import otcclip._otmatch" || { echo "setup: the extension did not build" >&2; exit 1; }
