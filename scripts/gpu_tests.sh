#!/usr/bin/env bash
# The test suite on a CUDA machine: the kernels compiled, the kernel and model tests on the GPU.
#
#   bash scripts/gpu_tests.sh [PYTEST ARGS...]     (from the repository root; default: the whole suite)
#
# Sets up the GPU machine's environment (scripts/gpu_env.sh), runs pytest with a JUnit report and a log into
# $OUT (or /tmp/gpu_tests), prints the counts and writes gpu_tests_<card>_<date>.json beside them: card, date,
# commit, the pytest arguments and the counts; commit that file under scripts/results/. The commit is
# $GIT_COMMIT, else `git rev-parse HEAD` (the device machine's copy has no .git: pass GIT_COMMIT=... there).
# With pytest-xdist installed the tests run in one worker per core but two, each worker on one thread. On the
# 16-core H200 machine (2026-12-01) 12 workers of 16 threads each had not finished the suite after 468 s; one
# worker of one thread ran all of it in 298 s.
set -uo pipefail
cd "$(dirname "$0")/.."
commit=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# shellcheck disable=SC1091
source scripts/gpu_env.sh || exit 1
out=${OUT:-/tmp/gpu_tests}
mkdir -p "$out"
cores=$(nproc)  # before OMP_NUM_THREADS is set: nproc reads it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
workers=()
if python3 -c "import xdist" 2>/dev/null; then workers=(-n "$((cores > 3 ? cores - 2 : 1))"); fi
python3 -m pytest -q -p no:cacheprovider -rf "${workers[@]}" --junitxml="$out/junit.xml" "$@" 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
python3 scripts/gpu_tests_result.py "$out/junit.xml" --commit "$commit" --args "${workers[*]} $*" --out "$out" || exit 1
exit "$status"
