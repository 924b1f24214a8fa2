#!/usr/bin/env bash
# Install motus_fast on a CPU-only machine from the project's own files: pinned requirements (torch is the local
# CPU wheel, never an unpinned torch), then the package itself without dependency resolution.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -r requirements/cpu.txt
# openpi-client pins numpy<2 in its metadata but works with numpy 2: install it without its dependency pins
python -m pip install -q --no-deps openpi-client==0.1.2
python -m pip install -q --no-deps -e .
