#!/usr/bin/env bash
# The head on an NVIDIA GPU, checked on a machine that has one and no network:
#
#     tests/gpu/check.sh SOURCES [OUT]
#
# SOURCES holds what pip cannot fetch there: the sources of ggml-python 0.0.45 and llama-cpp-python 0.3.36 (their
# sdists, or unpacked source folders), and the wheels of gguf and diskcache (pure Python). The machine needs the
# CUDA toolkit (nvcc), CMake, ninja, Python 3.11 or 3.12 with numpy, tokenizers, jinja2, tqdm, pyyaml, psutil,
# pytest and scikit-build-core. It builds both for this GPU's architecture only (a few minutes on 16 cores), in
# a virtual environment under OUT (default /tmp/kimi-gpu) that sees the system's packages, then runs:
#   - the tests that need a GPU (tests/test_compute_device.py): devices, placement, the scheduler's cut at the
#     experts, parity with the CPU path and with llama.cpp;
#   - tests/bench/bench_gpu.py: decode and prefill beside llama.cpp with the same split (-ngl 99 -ot exps=CPU) on
#     the k2-slice and k2-depth models, and parity with our CPU path and llama.cpp's.
set -euo pipefail
SOURCES=$(realpath "${1:?usage: tests/gpu/check.sh SOURCES [OUT]}")
OUT=${2:-/tmp/kimi-gpu}
cd "$(dirname "$0")/../.."
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')
echo "== GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1), architecture $arch"
python3 -m venv --system-site-packages "$OUT/venv"
py="$OUT/venv/bin/python"
pip_install() { "$py" -m pip install -q --no-index --no-deps --no-build-isolation --find-links "$SOURCES" "$@"; }
pip_install "$SOURCES"/gguf-*.whl "$SOURCES"/diskcache-*.whl
source_of() { ls -d "$SOURCES"/$1-* | head -1; }
for package in ggml_python llama_cpp_python; do
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=ON" pip_install "$(source_of $package)"
    echo "== built $package with CUDA in $(( $(date +%s) - start )) s"
done
"$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # without setuptools' editable support
"$py" -c "from runtime.ggml_backends import devices; print('== ggml devices:', *devices(), sep='\n   ')"
echo "== tests that need a GPU"
"$py" -m pytest -q -p no:cacheprovider tests/test_compute_device.py -k "gpu and not workers" -rs
echo "== bench_gpu"
"$py" tests/bench/bench_gpu.py --gpu 0 --threads "$(nproc)"
