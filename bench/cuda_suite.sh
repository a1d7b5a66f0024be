#!/usr/bin/env bash
# The test suite on the GPU machine (MLX CUDA), from a copy of the checkout: docs/testing.md says how to carry it.
# Installs the wheels in $WHEELS (the test extra's packages the machine lacks: trio, llguidance, jsonschema, ...)
# into /tmp/site beside the .gpu kit, runs pytest over pytest-xdist and writes $OUT/cuda_suite.log,
# $OUT/cuda_suite.xml and a passed/failed table per file ($OUT/cuda_suite_by_file.txt, printed last).
#   usage (in the checkout's root on the GPU machine): bash bench/cuda_suite.sh [pytest args]
# A hung or slow run stays diagnosable: every test has a deadline ($TEST_TIMEOUT s, pytest-timeout, unless the
# args give --timeout), the log names each test as it ends ("[gw3] PASSED tests/x.py::t", -v) and, when
# $SUITE_TIMEOUT runs out, pytest gets SIGINT first (it then writes its summary, the junit xml and the slowest
# durations) and SIGKILL 30 s later; without an xml the table is built from the log's per-test lines.
set -uo pipefail
OUT=${OUT:-/tmp/cuda_suite}
WHEELS=${WHEELS:-.whl}
WORKERS=${WORKERS:-14}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" | tee -a "$OUT/gpu.txt"
EXTRA=()
if python3 -c "import pytest_timeout" 2>/dev/null && [[ " $* " != *" --timeout"* ]]; then
    EXTRA+=(--timeout="${TEST_TIMEOUT:-150}")
fi
# -p no:benchmark: pytest-benchmark (on the machine) warns once per xdist worker that it is off
timeout -s INT -k 30 "${SUITE_TIMEOUT:-560}" python3 -m pytest -n "$WORKERS" -v -p no:cacheprovider -p no:benchmark \
    -rfE --tb=short --durations=25 --junitxml="$OUT/cuda_suite.xml" "${EXTRA[@]}" "$@" > "$OUT/cuda_suite.log" 2>&1
echo "pytest rc=$? (124: the suite ran past SUITE_TIMEOUT=${SUITE_TIMEOUT:-560} s)"
python3 - "$OUT" <<'EOF'
import collections, re, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
by = collections.defaultdict(collections.Counter)
try:
    root = ET.parse(f"{out}/cuda_suite.xml").getroot()
    for case in root.iter("testcase"):
        f = case.get("classname", "?").split(".")[1] if "." in case.get("classname", "") else case.get("classname")
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        by[f][kind] += 1
except (OSError, ET.ParseError) as e:  # killed before pytest wrote it: count the log's per-test lines (-v)
    print(f"no junit xml ({e}): counted from {out}/cuda_suite.log")
    kinds = {"PASSED": "passed", "FAILED": "failure", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "skipped",
             "XPASS": "passed"}
    for m in re.finditer(r"^\[gw\d+\] \[\s*\d+%\] (\w+) tests/([\w/]+)\.py::", open(f"{out}/cuda_suite.log",
                         errors="replace").read(), re.M):
        if m.group(1) in kinds:
            by[m.group(2)][kinds[m.group(1)]] += 1
lines = [f"{'file':40s} passed failed error skipped"]
for f, c in sorted(by.items()):
    lines.append(f"{f:40s} {c['passed']:6d} {c['failure']:6d} {c['error']:5d} {c['skipped']:7d}")
tot = sum(by.values(), collections.Counter())
lines.append(f"{'TOTAL':40s} {tot['passed']:6d} {tot['failure']:6d} {tot['error']:5d} {tot['skipped']:7d}")
open(f"{out}/cuda_suite_by_file.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(l for l in lines if l.startswith(("file", "TOTAL")) or l.split()[2:4] != ["0", "0"]))
EOF
grep -E "^(FAILED|ERROR)" "$OUT/cuda_suite.log" | head -60
tail -1 "$OUT/cuda_suite.log"
