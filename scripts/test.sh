#!/usr/bin/env bash
# Installs whatever is missing, then runs every check and test: Rust (fmt, clippy,
# tests) and Python (ruff, pytest). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${OTCCLIP_VENV:-$PWD/.venv}

echo "== cargo fmt"; cargo fmt --all --check
echo "== cargo clippy"; cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --cargo-quiet
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --quiet
fi
echo "== ruff"; "$VENV/bin/ruff" check python tests benchmarks
echo "== pytest"; "$VENV/bin/python" -m pytest -q "$@"
