#!/usr/bin/env bash
# Every GPU check of issues 2 and 6 in one prepared run, for a session lent the H200 device machine
# (15 minutes of device time per session, start included). Every part (PARTS below) takes ~9 minutes
# with the limits set here; what 2026-12-04 measured already (benchmarks/README.md) can be left out,
# e.g. PARTS="tests gpu_letterbox" (~4 minutes) for the first measurement of --gpu-letterbox.
# Not yet measured on a GPU (2026-12-04, fifth session): the device stage beside the model and the
# workers' share of --gpu-jpeg (exact, and with --fast-jpeg), and --gpu-letterbox. Two calls cover them:
#   PARTS="tests gpu_jpeg" REPEATS=1 GJ="512 32 16 256 256 16384"   (~6 minutes: timeout_s=480)
#   PARTS="gpu_letterbox" REPEATS=2                                  (~3 minutes)
#
# That machine has Python 3.12 with torch, torchvision, numpy, pandas, pyarrow, pillow and pytest,
# but not curator's other dependencies, and it cannot download: they travel as wheels.
#   Here, once:   bash benchmarks/device_check.sh --fetch        (wheels into .whl/, which git ignores; ~33 MB)
#   Then:         run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=590)
# Results land in $OUT (pytest log, JSON figures); copy the figures into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then
  grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
  # faiss-cpu and python-gdcm stay behind (the 64 MiB limit on what travels): these checks build
  # no index and read no compressed DICOM.
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    open_clip_torch ftfy wcwidth duckdb pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle
  du -sh .whl
  exit
fi

OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
# A dry run on a CPU machine where curator is installed: DEVICE=cpu SMALL=1 SKIP_INSTALL=1 bash benchmarks/device_check.sh
DEVICE=${DEVICE:-cuda}
if [ -n "${SMALL:-}" ]; then N=(16 4 2 8 16 48); else N=(2048 64 16 256 256 16384); fi  # images, distinct, workers, batch, throughput images, --gpu-jpeg images
[ -n "${GJ:-}" ] && read -r -a N <<<"$GJ"  # e.g. GJ="512 32 16 256 256 16384": a shorter exact half for a second run
# Which checks (default: tests gpu_jpeg gpu_letterbox throughput); e.g. PARTS="tests profile gpu_jpeg" REPEATS=1 for a second, shorter run.
PARTS=" ${PARTS:-tests gpu_jpeg gpu_letterbox throughput} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
python3 -c "import open_clip, duckdb, pydicom, torchvision.io, curator.pipelines.embed, curator.device_jpeg" || exit 1  # fail fast
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc; python3 -c "import torch, torchvision, PIL; print(torch.__version__, torchvision.__version__, PIL.__version__)"; } | tee "$OUT/machine.txt"

# 1. The tests that take the GPU path where one is present (device JPEG decode/resize, replicas, --device cuda).
has tests && timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_device_jpeg.py tests/test_multi_device.py 2>&1 | tee "$OUT/pytest.txt" | tail -15

# 2. Where the device stage's time goes: nvJPEG decode vs the letterbox (film by film, stacked), by film size.
if has profile; then
  if [ -n "${SMALL:-}" ]; then P=(--size 1000x1250 --batch 8 --films 4); else P=(--size 2000x2500 --size 1000x1250 --batch 64 --batch 256 --films 16); fi
  timeout 150 python3 benchmarks/gpu_decode_profile.py --device "$DEVICE" "${P[@]}" --repeats 3 >"$OUT/gpu_decode_profile.json" 2>"$OUT/gpu_decode_profile.err"
  echo "gpu_decode_profile rc $?"; grep -E '"size"|_ips|_mps' -A0 "$OUT/gpu_decode_profile.json" | tr -d ' \n'; echo
fi

# 3. --gpu-jpeg against the exact path: throughput and deviation (issue 6, item 5); the device path in turn with
#    the model, beside it (overlap), with the workers' adaptive share, that with --gpu-letterbox, and that with
#    --fast-jpeg for the workers' share (~240 s a repeat).
has gpu_jpeg && { timeout 380 python3 benchmarks/gpu_jpeg.py --device "$DEVICE" --images ${N[0]} --distinct ${N[1]} --workers ${N[2]} --batch-size ${N[3]} --device-images ${N[5]} --repeats ${REPEATS:-1} --json \
  >"$OUT/gpu_jpeg.json" 2>"$OUT/gpu_jpeg.err"; echo "gpu_jpeg rc $?"; tail -c 1500 "$OUT/gpu_jpeg.json"; grep '^{' "$OUT/gpu_jpeg.err" | tail -2; }

# 4. --gpu-letterbox against the default path: the workers' rate, the device letterbox, end to end, the deviation.
has gpu_letterbox && { timeout 200 python3 benchmarks/gpu_letterbox.py --device "$DEVICE" --images ${N[4]} --workers ${N[2]} --batch-size ${N[3]} --repeats ${REPEATS:-2} --json \
  >"$OUT/gpu_letterbox.json" 2>"$OUT/gpu_letterbox.err"; echo "gpu_letterbox rc $?"; tail -c 2500 "$OUT/gpu_letterbox.json"; }

# 5. Issue 2's four figures on the GPU (FORMAT=jpeg by default, or dicom; the CheXzero-flow baseline runs batch 1, so few images).
has throughput && { timeout 150 python3 benchmarks/embed_throughput.py --device "$DEVICE" --images ${N[4]} --batch-size ${N[3]} --workers ${N[2]} --repeats 1 --format ${FORMAT:-jpeg} --json \
  >"$OUT/embed_throughput.json" 2>"$OUT/embed_throughput.err"; echo "embed_throughput rc $?"; grep -E '"(a|b|c|d)_|bound|a_over' "$OUT/embed_throughput.json"; }
