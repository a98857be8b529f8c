#!/bin/bash
# The issue-13 layout check on the real embedded model: 1 process x 1 device, 1 x 4 and 2 x 2 (two local
# processes over 127.0.0.1), one after the other so wall times are comparable. From the repository root:
#   bash benchmarks/layouts/run_all.sh [OUT]     then     python benchmarks/layouts/table.py OUT
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}; S=benchmarks/layouts/real_layouts.py; O=${1:-/tmp/layouts}
export JAX_PLATFORMS=cpu
$PY $S $O 1x1
$PY $S $O 1x4
PORT=$($PY -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
$PY $S $O 2x2 $PORT 0 & $PY $S $O 2x2 $PORT 1; wait
