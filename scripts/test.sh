#!/usr/bin/env bash
# Install what the tests need (into ./.venv unless a virtual environment is already active) and run the suite.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python_env.sh
ensure_python_env requirements-dev.txt
python -m pytest "$@"
