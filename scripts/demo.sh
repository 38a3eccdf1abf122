#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job: `rehyat-compile demo` on the embedded tiny Wan2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rehyat-compile demo "$@"
