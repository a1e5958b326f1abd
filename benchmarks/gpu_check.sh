#!/usr/bin/env bash
# The GPU check (issue #20): every codec on CUDA, the kernel benchmark table and a demo-model eval, on a
# machine whose PyTorch/Triton/transformers may be older than pyproject's (the lent H100/H200 machines:
# torch 2.11, triton 3.6, transformers 5.17, no pulp, no network). Bounded: at most GPU_CHECK_BUDGET
# seconds (default 360) in all; each step runs under `timeout` with what is left, a failing step is
# reported and the next one runs. Prints every step's output and time, and a summary at the end; with
# $OUT set (the device tool's output folder) the whole log is also written to $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh            from the repository root or anywhere
#
# Steps: environment (GPU, versions, transformers API our quantizer uses), install (wheels carried in
# .whl/ if any, then this checkout with `pip install --no-deps`, keeping the machine's torch and
# transformers), `pytest -m cuda tests/test_cuda.py`, a 4-bit demo model quantized and evaluated on the
# GPU (`moecompress quantize/eval --device cuda`, against the unquantized demo model), and
# `benchmarks/kernel_speed.py --short`.
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-360}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
rm -rf "$WORK" && mkdir -p "$WORK"
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}  # where the demo model is quantized and evaluated (cpu for a dry run)
export PY WORK DEV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET MOECOMPRESS_KERNELS
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried with the working tree: installed by install_pkg
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SUMMARY=()

exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S CMD...: run CMD (a program, or a function of this script: exported, run by bash -c) under
# timeout (at most LIMIT_S, never past the budget), record rc and time
step() {
    local name=$1 limit=$2 rc t0 l
    shift 2
    l=$(left)
    if ((l < 15)); then
        echo "### $name: SKIPPED (budget of ${BUDGET}s spent)"
        SUMMARY+=("$name: skipped (no time left)")
        return 0
    fi
    ((limit > l)) && limit=$l
    echo
    echo "### $name (limit ${limit}s, $(($(date +%s) - START))s elapsed)"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        timeout -k 10 "$limit" bash -c "$*"
    else
        timeout -k 10 "$limit" "$@"
    fi
    rc=$?
    local dt=$(($(date +%s) - t0))
    local what="rc=$rc"
    ((rc == 124 || rc == 137)) && what="TIMED OUT after ${limit}s"
    ((rc == 0)) && what="ok"
    echo "### $name: $what, ${dt}s"
    SUMMARY+=("$name: $what, ${dt}s")
    return 0
}

env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "transformers", "safetensors", "accelerate", "pytest"):
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m}: MISSING ({type(e).__name__})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
# the transformers API moecompress relies on (hf_quantizer.py, runtime.py): report what this version lacks
from transformers.quantizers import auto, base
need = {"quantizers.auto.register_quantizer": hasattr(auto, "register_quantizer"),
        "quantizers.auto.register_quantization_config": hasattr(auto, "register_quantization_config"),
        "HfQuantizer._process_model_before_weight_loading": hasattr(base.HfQuantizer, "_process_model_before_weight_loading"),
        "HfQuantizer.get_state_dict_and_metadata": hasattr(base.HfQuantizer, "get_state_dict_and_metadata"),
        "HfQuantizer.update_attn_implementation (dtype='auto' -> float32 on CPU)": hasattr(base.HfQuantizer, "update_attn_implementation")}
for k, v in need.items():
    print(f"transformers API {k}: {'present' if v else 'ABSENT'}")
EOF
}

install_pkg() {
    if [[ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then  # a dry run in an environment that has moecompress already
        echo "install skipped (GPU_CHECK_SKIP_INSTALL)"
        return 0
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried with the working tree (device README)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    fi
    # --no-deps keeps the machine's torch/triton/transformers (pyproject asks for newer ones than it has)
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index . || return 1
    "$PY" -c "import moecompress, moecompress.kernels, moecompress.codecs; print('moecompress importable from', moecompress.__file__)"
}

MC() { "$PY" -m moecompress.cli "$@"; }

demo_eval() {
    local data demo t0 text
    data=$("$PY" -c "from importlib import resources; print(resources.files('moecompress.data'))") || return 1
    demo=$data/demo-model text=$data/text/eval_mix.txt  # the package's demo model and evaluation text
    echo "--- quantize the demo model at 4 bits (GPTQ, 32 calibration windows) on $DEV"
    t0=$SECONDS
    MC -q quantize --out "$WORK/demo-w4" --bits 4 --nsamples 32 --device "$DEV" || return 1
    echo "quantize: $((SECONDS - t0)) s"
    echo "--- eval: the packed 4-bit model on $DEV"
    t0=$SECONDS
    MC -q eval "$WORK/demo-w4" --text "$text" --device "$DEV" --json "$WORK/eval_w4.json" || return 1
    echo "eval packed: $((SECONDS - t0)) s"
    echo "--- eval: the original demo model on $DEV"
    t0=$SECONDS
    MC -q eval "$demo" --text "$text" --device "$DEV" --json "$WORK/eval_orig.json" || return 1
    echo "eval original: $((SECONDS - t0)) s"
    "$PY" -c "import json, sys; q, o = (json.load(open(p))['perplexity'] for p in sys.argv[1:]); \
print(f'eval_mix perplexity: 4-bit packed {q:.3f}, original {o:.3f} ({100 * (q / o - 1):+.1f}%)')" \
        "$WORK/eval_w4.json" "$WORK/eval_orig.json"
}

export -f env_report install_pkg MC demo_eval
step environment 60 env_report
step install 90 install_pkg
step cuda-tests 170 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs --durations=8
step demo-eval 80 demo_eval
step kernel-speed 100 "$PY" benchmarks/kernel_speed.py --short

echo
echo "### summary ($(($(date +%s) - START))s of ${BUDGET}s)"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
[[ -n "${OUT:-}" && -d "$WORK" ]] && cp "$WORK"/*.json "$OUT"/ 2>/dev/null
exit 0
