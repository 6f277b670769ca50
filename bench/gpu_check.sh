#!/usr/bin/env bash
# GPU readiness check: install what an offline CUDA machine lacks, run the gpu-marked tests,
# and measure the CIFAR preset on synthetic CIFAR-shaped data (data=synthetic) with
# bench/performance.py: training images/s and MFU in bf16 at batch 128 without and with
# torch.compile (against the bf16 matmul and conv peaks measured in the same run), the share
# of a step outside the UNet, peak memory, and DDIM-50 sampling images/s at batch 1000 in bf16,
# eager and compiled.
#
#   bench/gpu_check.sh --prepare             # here, with a package index: wheels into .whl/
#   bench/gpu_check.sh OUTDIR                # there (a copy of this tree plus .whl/): < 8 minutes
#   bench/gpu_check.sh --device cpu --quick OUTDIR   # the same stages on a CPU, tiny sizes
#
# The GPU machine is assumed to have Python 3.12 with PyTorch, Lightning, torchvision,
# torchmetrics and numpy, and no internet. --prepare downloads, for that Python
# (GPU_PYTHON_VERSION, default 3.12) and manylinux x86-64, the wheels of what such an image
# may lack: Hydra and OmegaConf with their dependencies, rich (the progress bars) and pytest;
# antlr4-python3-runtime has no wheel on PyPI, so it is built here (pure Python). About 4 MB:
# the device tool carries at most 64 MiB of ignored files ("carry": [".whl"]). scikit-learn
# (the digits) and SciPy are ~50 MB and left out: the gpu-marked tests use data=synthetic,
# and only tests/test_jobs.py's CUDA test reads the digits (EXTRA_WHEELS="scikit-learn scipy
# joblib threadpoolctl" adds them). The install stage installs only the wheels whose
# package is missing, with pip --no-index --no-deps into a folder put on PYTHONPATH, then the
# project itself (editable, else into that folder).
#
# Every stage runs even when an earlier one failed; each one's exit status and time go to
# OUTDIR/stages.tsv, its output to OUTDIR/gpu_check.log. Figures: OUTDIR/train_bf16.json and
# OUTDIR/train_bf16_compile.json (every number of bench/performance.py), OUTDIR/results.md
# (rows for bench/results.md), OUTDIR/pytest_gpu.xml, and OUTDIR/summary.md and
# summary.json (bench/gpu_check_summary.py). Exit status 0 when every stage passed.
# The stages share a time budget (GPU_CHECK_BUDGET_S, default 475 s): each gets at most its
# own limit and what is left of the budget.

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

DEVICE=cuda QUICK=0 PREPARE=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE=1 ;;
        --quick) QUICK=1 ;;
        --device) DEVICE="${2:-}"; shift ;;
        --device=*) DEVICE="${1#--device=}" ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage 2 ;;
        *) OUT="$1" ;;
    esac
    shift
done
case "$DEVICE" in cpu|cuda) ;; *) echo "--device must be cpu or cuda, not '$DEVICE'" >&2; exit 2 ;; esac

# The project's virtualenv where there is one (a developer's machine), else the image's python3.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
WHEELS="${WHEELS:-$REPO/.whl}"
SITE="${SITE:-${TMPDIR:-/tmp}/diffusion_gpu_check_site}"
# What a CUDA image with torch, lightning, torchvision and torchmetrics may lack (one version
# of each: the ones installed here, so the GPU runs what was tested here).
BINARY_WHEELS="hydra-core omegaconf PyYAML rich markdown-it-py mdurl Pygments pytest iniconfig pluggy ${EXTRA_WHEELS:-}"
SOURCE_ONLY="antlr4-python3-runtime"  # omegaconf 2.3 pins 4.9.*, published as an sdist only

pinned() {  # NAME==VERSION as installed for $PYTHON (tested here), else a compatible range
    "$PYTHON" - "$@" <<'EOF'
import importlib.metadata as md, sys
# Hydra 1.3 wants OmegaConf 2.2-2.3, which pins ANTLR's runtime to 4.9.
RANGES = {"hydra-core": ">=1.3,<1.4", "omegaconf": ">=2.3,<2.4", "antlr4-python3-runtime": "==4.9.*"}
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name + RANGES.get(name, ""))
EOF
}

prepare() {
    local version="${GPU_PYTHON_VERSION:-3.12}"
    local abi="cp${version/./}"
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --abi "$abi" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $(pinned $BINARY_WHEELS) || return 1
    # shellcheck disable=SC2046
    "$PYTHON" -m pip wheel --quiet --no-deps --no-binary "$SOURCE_ONLY" -w "$WHEELS" $(pinned $SOURCE_ONLY) || return 1
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

if [ "$PREPARE" = 1 ]; then
    prepare
    exit $?
fi
[ -n "$OUT" ] || { echo "usage: bench/gpu_check.sh [--device cpu|cuda] [--quick] OUTDIR | --prepare" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
printf 'stage\tstatus\tseconds\tlimit_s\n' >"$OUT/stages.tsv"
START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET_S:-475}"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

stage() {  # stage NAME LIMIT_S COMMAND...: run it within the budget, log and record it
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -le 0 ]; then
        say "== $name: not run, the ${BUDGET} s budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" "not run" 0 0 >>"$OUT/stages.tsv"
        return 1
    fi
    say "== $name (at most ${limit} s): $*"
    local begin=$SECONDS status
    # through bash, so that a stage may be one of the functions below (exported)
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    say "== $name: exit status $status after $((SECONDS - begin)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" "$limit" >>"$OUT/stages.tsv"
    return "$status"
}

environment() {
    "$PYTHON" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], "at", sys.executable, "on", platform.platform())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("lightning", "torchvision", "torchmetrics", "numpy", "hydra-core", "omegaconf", "rich", "pytest", "scikit-learn"):
    try:
        from importlib.metadata import version
        print(name, version(name))
    except Exception:
        print(name, "missing")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    return 0
}

missing_wheels() {  # the wheels in $WHEELS whose distribution $PYTHON does not have
    "$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0].replace("_", "-")
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
}

link_project() {  # without build tools: the package as links in $SITE, configs where setup.py maps them
    echo "pip could not install it ($(grep -m 1 -E 'Error|error:' "$SITE/pip.err")); linking $REPO/src/diffusion into $SITE instead"
    rm -rf "$SITE/diffusion" && mkdir -p "$SITE/diffusion" || return 1
    ln -s "$REPO"/src/diffusion/* "$SITE/diffusion/" && ln -s "$REPO/configs" "$SITE/diffusion/configs" \
        && ln -s "$REPO/conf" "$SITE/diffusion/conf"
}

install_missing() {
    local wheels project
    mkdir -p "$SITE"
    if [ -d "$WHEELS" ]; then
        wheels="$(missing_wheels)"
        if [ -n "$wheels" ]; then
            echo "installing into $SITE:" $wheels
            # shellcheck disable=SC2086
            "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" $wheels || return 1
        else
            echo "every wheel in $WHEELS is installed already"
        fi
    else
        echo "no $WHEELS folder (bench/gpu_check.sh --prepare): nothing to install"
    fi
    project="$("$PYTHON" -c 'import diffusion, os; print(os.path.realpath(os.path.dirname(diffusion.__file__)))' 2>/dev/null)"
    if [ "$project" != "$(realpath "$REPO/src/diffusion")" ] && [ "$project" != "$SITE/diffusion" ]; then
        echo "installing the project (${project:-not importable} is not this tree's)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e "$REPO" 2>"$SITE/pip.err" \
            || link_project || return 1
    fi
    "$PYTHON" -c 'import diffusion, hydra, omegaconf, rich, pytest, lightning, torchmetrics
import diffusion.training.run, diffusion.jobs.sample, diffusion.jobs.evaluate
print("imports ok: diffusion from", diffusion.__file__)'
}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # before the install: the stages inherit it
export REPO PYTHON WHEELS SITE
export -f environment missing_wheels link_project install_missing

# Sizes: the CIFAR preset at full size on the GPU; a tiny UNet and batches of 2 for --quick.
PERF=(bench/performance.py --presets cifar_cosine_learned_sigma --device "$DEVICE" --precision bf16-mixed
      --override data=synthetic --results "$OUT/results.md")
if [ "$QUICK" = 1 ]; then
    PERF+=(--batch 2 --warmup 1 --steps 2 --sampler ddim10 --sample-batch 2
           --override model.model_channels=32 --override model.num_res_blocks=1
           --override "model.channel_mult=[1,2]" --override "model.attention_resolutions=[16]")
    COMPILE=(--compile --compile-backend aot_eager)  # Inductor's C++ build takes minutes on a small CPU
else
    PERF+=(--batch 128 --sample-batch 1000)
    COMPILE=(--compile)
fi

say "bench/gpu_check.sh on $(hostname) at $(date -u +%FT%TZ): device $DEVICE, quick $QUICK, python $PYTHON, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
stage environment 60 environment
stage install 90 install_missing
stage tests 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rfEs --junitxml="$OUT/pytest_gpu.xml" tests
stage train_bf16 120 "$PYTHON" "${PERF[@]}" --skip data --json "$OUT/train_bf16.json"
# Inductor compiles the CIFAR UNet's forward and backward in about 100 s on an H200 (its first
# run there timed out at 200 s while also measuring the peaks): the peaks of the stage before.
# Then DDIM-50 with the compiled UNet (an inference graph: one more compilation). The JSON is
# written after each part, so a stage that runs out of time keeps the training figures.
PEAKS=()
[ -s "$OUT/train_bf16.json" ] && PEAKS=(--peaks-from "$OUT/train_bf16.json")
stage train_bf16_compile 300 "$PYTHON" "${PERF[@]}" "${COMPILE[@]}" "${PEAKS[@]}" --skip data \
    --json "$OUT/train_bf16_compile.json"
"$PYTHON" bench/gpu_check_summary.py "$OUT" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
