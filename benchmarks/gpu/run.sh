#!/usr/bin/env bash
# The GPU check: the cuda-marked tests, then the throughput + peak-memory table.
# Usage: benchmarks/gpu/run.sh [OUT_DIR]   (default benchmarks/gpu/results/<UTC time>)
# Budget: under 10 minutes on one GPU (tests ~2 min, table ~6 min); each part has a timeout.
set -u
cd "$(dirname "$0")/../.."
OUT="${1:-benchmarks/gpu/results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python - > "$OUT/env.json" <<'PY'
import json, torch
from locallearn import precision
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "auto": precision.describe(precision.resolve("auto", "auto", "false", "cuda"))
                  if torch.cuda.is_available() else None}, indent=2))
PY
echo "== tests (pytest -m cuda) =="
timeout 240 python -m pytest -q -m cuda tests/test_cuda.py -rs --junitxml="$OUT/tests.xml" \
    2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
echo "== throughput and memory =="
timeout 330 python benchmarks/gpu/run.py "$OUT" 2>&1 | tee "$OUT/table.txt"
table=${PIPESTATUS[0]}
echo "tests exit $tests, table exit $table; results in $OUT"
exit $(( tests != 0 || table != 0 ))
