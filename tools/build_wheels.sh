#!/usr/bin/env bash
# Builds causal-conv1d and mamba-ssm WITH their CUDA extensions for one architecture (sm_90: H100/H200) on
# the device machine, in one device call of its own (`run`, timeout_s=600, carry [".whl"]):
#   bash tools/build_wheels.sh            # both (expected ~2-3 min causal-conv1d, ~5-7 min mamba-ssm)
#   bash tools/build_wheels.sh mamba-ssm  # or causal-conv1d: one of them
# Needs the sdists in .whl/src (fetched here, where the registry is reachable:
#   pip download --no-deps --no-binary :all: --no-build-isolation causal-conv1d -d .whl/src
#   MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm==2.3.2.post1 -d .whl/src)
# and ninja's wheel in .whl (pip download --no-deps ninja -d .whl). Both setup.py files compile for a fixed
# list of 5-8 architectures whatever TORCH_CUDA_ARCH_LIST says, so their gencode list is cut to sm_90.
# The wheels land in $OUT, split into 15 MiB parts where larger (the device returns files up to 16 MiB);
# here: copy them from files_at into .whl/ (tools/gpu_check.sh joins the parts) and carry .whl next time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/build
WHICH=${1:-both}
pip install --no-index --no-deps --quiet .whl/ninja-*.whl .whl/einops-*.whl
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    MAMBA_KEEP_CUDA_BUILD=TRUE

build() {  # sdist prefix
  rm -rf /tmp/build/$1-* && tar xzf .whl/src/$1-*.tar.gz -C /tmp/build
  local dir=$(ls -d /tmp/build/$1-*)
  python - "$dir/setup.py" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
one_arch = '["-gencode", "arch=compute_90,code=sm_90"]  # one architecture: tools/build_wheels.sh'
text, n = re.subn(r"^(\s*)(extra_compile_args = )", lambda m: f"{m[1]}cc_flag = {one_arch}\n{m[1]}{m[2]}", text,
                  flags=re.M)
assert n, "no extra_compile_args in " + path
open(path, "w").write(text)
PY
  echo "== building $1 at $(date -u +%T)"
  (cd "$dir" && timeout 560 pip wheel --no-deps --no-build-isolation . -w "$OUT" 2>&1 | tail -5)
}
[ "$WHICH" = mamba-ssm ] || build causal_conv1d
[ "$WHICH" = causal-conv1d ] || build mamba_ssm
cd "$OUT"
for wheel in *.whl; do
  if [ "$(stat -c %s "$wheel")" -gt $((15 * 1024 * 1024)) ]; then split -b 15M "$wheel" "$wheel.part-" && rm "$wheel"; fi
done
ls -la
