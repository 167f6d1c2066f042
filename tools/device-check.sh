#!/usr/bin/env bash
# The GPU checks, as one call of the device tool on a lent GPU machine (its image has torch, h5py, scipy,
# scikit-learn, matplotlib, pyyaml and pytest; zarr and numcodecs travel as wheels):
#
#   here, once:   bash tools/device-check.sh --wheels       # downloads them into .whl (git-ignored)
#   device tool:  run(command="bash tools/device-check.sh", carry=[".whl"], timeout_s=540)
#
# It runs the CUDA tests (tests/test_gpu.py, the GPU augmentation test) and bench_infer on the GPU with the
# automatic number of I/O threads and with one (do the readers keep up with the GPU?), and leaves the logs in
# $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.7.1
fi

OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import torch, zarr; print("torch", torch.__version__, "zarr", zarr.__version__)'; } \
    | tee "$OUT/gpu.txt"

# Budget (run's timeout_s=540): tests 150 s, section 90 s, benches 150 + 120 s; each step is cut at its share so
# that the ones after it still run and every log comes back.
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py "tests/test_augment.py::test_gpu_matches_cpu" \
    2>&1 | tee "$OUT/tests.log"
status=${PIPESTATUS[0]}

# The synthetic section once, outside the benches' time limits (each bench would otherwise start it again).
timeout 90 python3 benchmarks/bench_infer.py --work /tmp/bench-infer --prepare 2>&1 | tee "$OUT/bench-section.log"
cores=$(nproc)
# 0: the automatic number of I/O threads (the share of the cores less two); 1: do the readers keep up alone?
# paper first: the case that matters on a GPU, done before a time-out can cut the run short.
timeout 150 python3 benchmarks/bench_infer.py --device cuda --threads "$cores" --repeats 3 \
    --cases paper medium demo --sections 4 1 \
    --work /tmp/bench-infer --set "infer.io_threads=0" 2>&1 | tee "$OUT/bench-infer-io0.log"
timeout 120 python3 benchmarks/bench_infer.py --device cuda --threads "$cores" --repeats 3 \
    --cases paper demo --sections 4 \
    --work /tmp/bench-infer --set "infer.io_threads=1" 2>&1 | tee "$OUT/bench-infer-io1.log"
exit "$status"
