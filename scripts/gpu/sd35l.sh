#!/usr/bin/env bash
# On the GPU machine (one H200): SD3.5-large at full size (38 MMDiT blocks of 38 heads x 64, q/k RMS-norm; 8.1B
# parameters; issue 19): our fused float16 graph (--fused-kernels) and its FP8 version (--fused-kernels --fp8)
# beside diffusers' transformer in PyTorch eager and torch.compile, in the same call on the same card: random
# weights, fp16, 1024x1024, 28 steps, CFG 7 (batch 2), with the peak GPU memory of each mode.
# Targets (issue 19; eager 188.4 and torch.compile 130.7 ms/step measured before on an H200): fused fp16 <= 110
# ms/step, FP8 <= 75 ms/step.
# NOT RUN YET: written without a GPU. Its build stage ran on a 2-core CPU with SD3.5-large's widths and LAYERS=2
# (2 of the 38 blocks: 4.5 min there; dynamo is missing there, so the encoders took the TorchScript fallback), and
# examples/benchmark ran the three folders on the CPU (128x128, 2 steps: fused vs stock max 2 levels, FP8 vs fused
# max 4); the full-size build, the CUDA runs and PyTorch are untested.
#
# Stages (each skipped when its output exists, so a later call on a warm machine continues):
#   build   one background job (setsid: it runs on after the call that started it ends, while the machine stays
#           warm), log /tmp/sd35l-build.log (the encoders' in /tmp/sd35l-build-encoders.log):
#             /tmp/sd35l        export_sd3.py --random sd3.5-large --dtype fp16: the transformer (TorchScript + ORT
#                               fusions; 16.3 GB of float16 weights in transformer/model.onnx.data) and, beside it,
#                               the text encoders 1 layer deep at full width (TEXT_LAYERS, as build_sd3m.sh: not what
#                               is measured; T5 TorchScript mixed precision, CLIPs and VAE decoder dynamo);
#             /tmp/sd35l-fused  then fused_kernels.py: a new transformer/model.onnx (graph only), everything else hard
#                               links to /tmp/sd35l (no second copy of the weights);
#             /tmp/sd35l-fp8    then fused_kernels.py --fp8: the same, plus transformer/model_fp8.onnx_data (E4M3
#                               weights of the blocks' products, 5.4 GB); the float16 data file is a hard link (its
#                               adaLN, embedder and proj_out weights, 5.7 GB, are still read).
#           The stock transformer costs no disk of its own (the fused and FP8 folders link its data file), so it is
#           kept; STOCK=1 also times it (about one minute more).
#   time    ours (examples/benchmark: 1024x1024, 28 steps, CFG 7, medians of RUNS=2 after 1 warm-up, plus the
#           final latents of one more run) on sd35l-fused and sd35l-fp8 (and sd35l with STOCK=1), each with the peak
#           GPU memory of its process (nvidia-smi every 20 ms, minus the idle reading); then diffusers' transformer
#           alone (bench_torch.py --variant sd3.5-large --transformer-only --init-on-device: the export's config,
#           random weights drawn on the GPU; TORCH_SAME_WEIGHTS=1: the export's very weights, built on the CPU, 1-2
#           min more; TORCH_MODES=eager,compile; CUDA events over TORCH_ITERS=10 calls; peak allocated memory);
#           the table (table.py) to $OUT/table.md. OURS=0 or TORCH=0 leave out one side (to split it over calls).
#   check   no GPU time: the FP8 image and final latents against the float16 fused ones of the time stage (same
#           seed): max / mean level difference and PSNR; latents max / mean |diff| (check.txt).
# STAGE=build | time | check | measure (time + check) | all (default).
#
# Carry (a call moves at most 64 MiB with the tree, about 30.6 MiB): .whl (diffusers 0.42.1), the CUDA bundle
# (.ort-cuda: env.sh, VERSION and the pieces under parts/, 16.8 MB or less each) and .device-bin/benchmark.xz
# (built with --features cuda, from a commit with the FP8 kernels). What a call carried stays on the machine
# (diffusers in /tmp/site, the bundle's pieces in /opt/ort, the binary in /tmp/sd35l-bin; without one, fp8.sh's
# /tmp/fp8-bin/benchmark is taken), so on a fresh machine, about 25 MB each besides the tree:
# BUILD_WAIT=30 starts the build and returns: the GPU is free for other work while it runs (CPU, RAM and disk are
# not), e.g. the other scripts' measurements; then STAGE=all when it is done (build.txt in log.txt says how far).
#   1. STAGE=build  .whl/diffusers-0.42.1-py3-none-any.whl .device-bin/benchmark.xz .ort-cuda/env.sh
#                   .ort-cuda/VERSION .ort-cuda/parts/a/libonnxruntime_providers_cuda.so.xz.00-of-4
#                   (starts the build, waits BUILD_WAIT=540 s for it)
#   2. STAGE=build  .ort-cuda/env.sh .ort-cuda/VERSION .ort-cuda/parts/a/libonnxruntime_providers_cuda.so.xz.01-of-4
#                   .ort-cuda/parts/b/libonnxruntime_providers_cuda.so.xz.03-of-4
#                   .ort-cuda/parts/b/libonnxruntime_providers_shared.so.xz.00-of-1   (waits 540 s more)
#   3. STAGE=all    .ort-cuda/env.sh .ort-cuda/VERSION .ort-cuda/parts/b/libonnxruntime_providers_cuda.so.xz.02-of-4
#                   .ort-cuda/parts/b/libonnxruntime.so.1.31.1.xz.00-of-1   (the rest of the build, then time +
#                   check, ~5-6 min; cut at the 10-minute limit, a 4th STAGE=all call carrying env.sh and VERSION
#                   continues)
# each call within the machine's warm window of the previous one. On a machine where sd35m.sh / fp8.sh already
# ran (bundle in /opt/ort, diffusers in /tmp/site, /tmp/fp8-bin), carry only .ort-cuda/env.sh .ort-cuda/VERSION:
# STAGE=all, repeated until it reports "total". A call cut at the limit loses nothing done: STAGE=all (or
# measure) again skips finished variants and torch.json. Less time: TORCH_MODES=eager (no torch.compile, 2-3 min
# less) or TORCH=0; STAGE=time TORCH=0 then STAGE=measure OURS=0 splits the measurement over two calls.
# Expected on the device (not measured; scaled by parameters from CPU runs at 2-3 of the 38 blocks, whose rates
# also give build_sd3m.sh's SD3-medium transformer job within 1-1.5x of its device times): the transformer's
# export 8-13 min (random weights 2-3, TorchScript export 3-5 with --torchscript-shape-inference off (the
# exporter's own shape inference copies every weight: over half of its time; TS_SHAPE_INFERENCE=on puts it back,
# 3-5 min more), the float16 save 2-3, graph passes 1; the encoders beside it, 2-3 min), the fused rewrite under a
# minute, the FP8 rewrite 1-2 min: build 10-16 min; ours under a minute per variant (loading 16 GB of weights,
# then 4 images of 28 steps); PyTorch 3-4 min (eager under a minute, torch.compile of 38 blocks 2-3). About 15-22
# min of device time in all: more than a session's 30 min holds beside much other work, so run it first (or alone).
# DISK (64 GiB on the machine, shared with /tmp/sd3m*, /tmp/sd35m*): the export's float32 weights (32.5 GB, the
# TorchScript exporter's files, used in place by export_sd3.py) are released tensor by tensor while the float16
# file is written, so the peak stays near 33 GB; at the end /tmp/sd35l* hold about 23 GB (16.3 float16 + 5.4 E4M3
# + 0.9 encoders). The build refuses to start with less than NEED_GB=36 GB free in /tmp (52 where /tmp cannot
# punch holes: checked first; it lists what is there);
# PRUNE=1 first deletes the other scripts' model folders (/tmp/sd3m /tmp/sd3m-fused /tmp/sd3m-fp8 /tmp/sd3m-dyn
# /tmp/sd35m /tmp/sd35m-fused /tmp/tiny-smoke; not their results). EXPORT_TMP (default /tmp) puts the float32
# files elsewhere (e.g. /dev/shm if it is that big: RAM then).
# RAM (128 GiB): the random model is built in float32 (32.5 GB: the export's float16 conversion starts from the
# float32 graph); the TorchScript exporter writes its weights to files beside the graph (> 2 GB) and holds about
# 1.6x the float32 weights at its peak (1.63x measured at 3 blocks: ~53 GB at full size); the encoders' export
# beside it takes a few GB; the FP8 rewrite holds the float16 block weights it reads plus their E4M3 bytes
# (~20-25 GB); PyTorch draws its model on the GPU (32.5 GB float32 there for a moment, then 16.3 GB float16;
# TORCH_SAME_WEIGHTS=1: on the CPU instead).
# Results in /tmp/sd35l-results; $OUT gets at most 8 files: table.md, log.txt (card, disk, build, rewrites, our
# runs, peaks, PyTorch), check.txt, ours-sd35l-fused.json, ours-sd35l-fp8.json, ours-sd35l.json (STOCK=1),
# torch.json and ours-sd35l-fp8.png.
# For a CPU try of the build: STAGE=build LAYERS=2 (SD3.5-large widths, 2 blocks; the folders get the same names).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FINAL=$OUT; OUT=/tmp/sd35l-results; mkdir -p "$OUT"
STAGE=${STAGE:-all}
M=/tmp/sd35l; FUSED=/tmp/sd35l-fused; FP8=/tmp/sd35l-fp8
TOOLS=/tmp/sd35l-tools  # the export tools and tokenizers, copied once: the background job must not read the tree
BLOG=/tmp/sd35l-build.log
collect() {  # at most 8 files back
  tail -n +1 "$OUT"/card.txt "$OUT"/disk.txt "$OUT"/build.txt "$OUT"/ours-*.log "$OUT"/peak-*.txt "$OUT"/torch.log \
    2>/dev/null > "$FINAL/log.txt"
  for f in table.md check.txt ours-sd35l-fused.json ours-sd35l-fp8.json ours-sd35l.json torch.json ours-sd35l-fp8.png; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"
  done
}
trap collect EXIT
want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ] || { [ "$STAGE" = measure ] && [ "$1" != build ]; }; }
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/card.txt"
else
  echo "no nvidia-smi: build only" | tee "$OUT/card.txt"
fi
t0=$(date +%s)
disk() { { date +%T; df -h /tmp | tail -1; free -g | sed -n 2p; du -sh /tmp/sd35l /tmp/sd35l-fp8/transformer/model_fp8.onnx_data 2>/dev/null; } | tee -a "$OUT/disk.txt"; }
disk
# keep what this call carried (see above)
[ -f .ort-cuda/env.sh ] && ( source .ort-cuda/env.sh )
BIN=/tmp/sd35l-bin/benchmark; mkdir -p /tmp/sd35l-bin
if [ -x .device-bin/benchmark ]; then
  cp .device-bin/benchmark "$BIN"
elif [ -f .device-bin/benchmark.xz ]; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/benchmark.xz "$BIN"
fi
[ -f "$BIN" ] && chmod +x "$BIN"
if [ ! -f "$BIN" ] && [ -x /tmp/fp8-bin/benchmark ]; then  # fp8.sh ran on this machine: its binary has the FP8 kernels
  cp /tmp/fp8-bin/benchmark "$BIN"; echo "benchmark binary from fp8.sh's /tmp/fp8-bin"
fi
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
fi
built() { [ -f $FP8/transformer/model.onnx ] && [ -f /tmp/sd35l-build.done ]; }

if want build || ! built; then
  if [ ! -f /tmp/sd35l-build.started ]; then  # once: the job runs on after a call that ends
    python3 -c "import diffusers" 2>/dev/null || { echo "no diffusers: carry .whl"; exit 1; }
    free_gb=$(df -P -BG /tmp | awk 'NR==2 {gsub("G", "", $4); print $4}')
    # the disk peak assumes /tmp can punch holes (export_sd3.py gives the float32 data back while saving); where it
    # cannot, the float32 and float16 weights coexist: 49 GB
    punch=$(python3 - <<'PY'
import ctypes, os, tempfile
fd, p = tempfile.mkstemp(dir=os.environ.get("EXPORT_TMP", "/tmp"))
try:
    os.write(fd, b"x" * (8 << 20)); os.fsync(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    ok = libc.fallocate(fd, 3, 0, 8 << 20) == 0 and os.fstat(fd).st_blocks * 512 < (1 << 20)
    print("yes" if ok else "no")
finally:
    os.close(fd); os.unlink(p)
PY
)
    echo "hole punching in ${EXPORT_TMP:-/tmp}: ${punch:-unknown}"
    [ "$punch" = yes ] || NEED_GB=${NEED_GB:-52}
    if [ "${PRUNE:-0}" = 1 ] && [ "$free_gb" -lt "${NEED_GB:-36}" ]; then
      echo "PRUNE=1: deleting the other scripts' model folders"
      rm -rf /tmp/sd3m /tmp/sd3m-fused /tmp/sd3m-fp8 /tmp/sd3m-dyn /tmp/sd35m /tmp/sd35m-fused /tmp/tiny-smoke
      free_gb=$(df -P -BG /tmp | awk 'NR==2 {gsub("G", "", $4); print $4}'); disk
    fi
    if [ "$free_gb" -lt "${NEED_GB:-36}" ]; then
      echo "only ${free_gb} GB free in /tmp, the build needs ${NEED_GB:-36} (peak of the export's float32 working copy):"
      du -sh /tmp/* 2>/dev/null | sort -h | tail -12
      echo "PRUNE=1 deletes /tmp/sd3m* and /tmp/sd35m* first (model folders only), or lower NEED_GB at your risk"
      exit 1
    fi
    rm -rf $TOOLS /tmp/sd35l-build.done; mkdir -p $TOOLS/models/fixtures
    cp -r models/export $TOOLS/models/export && cp -r models/fixtures/tiny-sd3 $TOOLS/models/fixtures/
    touch /tmp/sd35l-build.started
    # One job: the transformer, with the encoders (1 layer: small, 1-2 min) beside it as a child job, then the two
    # rewrites (they hard-link every component, so they come last). Each step's seconds go to the log; .done gets
    # the exit status.
    cat > $TOOLS/build.sh <<EOF
set -uo pipefail
cd $TOOLS
export PYTHONPATH=/tmp/site TMPDIR=${EXPORT_TMP:-/tmp}
step() { local t=\$(date +%s); echo "== \$1 (\$(date +%T))"; shift; "\$@"; local rc=\$?; echo "== rc \$rc after \$(( \$(date +%s) - t )) s; \$(df -h /tmp | tail -1)"; return \$rc; }
E="python3 models/export/export_sd3.py --random sd3.5-large --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16 --torchscript-shape-inference ${TS_SHAPE_INFERENCE:-off} ${LAYERS:+--layers $LAYERS}"
ET="\$E --text-layers ${TEXT_LAYERS:-1}"
python3 -c "import torch, transformers, diffusers, onnx, onnxruntime; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'threads', torch.get_num_threads())"
( step "T5 (1 layer)" \$ET --components text_encoder_3 --out $M &&
  { step "CLIPs and VAE decoder (dynamo)" \$ET --exporter dynamo --components text_encoder,text_encoder_2,vae_decoder --out $M ||
    step "CLIPs and VAE decoder (TorchScript: dynamo failed)" \$ET --components text_encoder,text_encoder_2,vae_decoder --out $M; }
) > /tmp/sd35l-build-encoders.log 2>&1 &
enc=\$!
{ [ -f $M/transformer/model.onnx ] || step "transformer export" \$E --components transformer --out $M; }
rc=\$?
wait \$enc; rc_enc=\$?
echo "== encoders (beside the transformer): rc \$rc_enc"; grep -E "^== " /tmp/sd35l-build-encoders.log
[ \$rc_enc = 0 ] || tail -20 /tmp/sd35l-build-encoders.log
[ \$rc = 0 ] && [ \$rc_enc = 0 ] &&
{ [ -f $FUSED/transformer/model.onnx ] || step "fused rewrite" python3 models/export/fused_kernels.py $M $FUSED; } &&
{ [ -f $FP8/transformer/model.onnx ] || step "fp8 rewrite" python3 models/export/fused_kernels.py --fp8 $M $FP8; }
rc=\$?
echo "build exit \$rc"; echo \$rc > /tmp/sd35l-build.done
EOF
    setsid nohup bash $TOOLS/build.sh > $BLOG 2>&1 < /dev/null &
    echo "build started in the background (log $BLOG)"
  fi
  limit=${BUILD_WAIT:-540}
  while [ ! -f /tmp/sd35l-build.done ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
    sleep 20
    echo "$(date +%T) $(grep -E '^\[|^== ' $BLOG | tail -1) | $(df -h /tmp | awk 'NR==2 {print $4 " free"}') | RAM $(free -g | awk 'NR==2 {print $3}') GB used"
  done
  grep -vE "Warning|warn\(|^\s*$" $BLOG | tail -40 > "$OUT/build.txt"; disk > /dev/null
  if [ ! -f /tmp/sd35l-build.done ]; then
    echo "build still running after ${limit} s: call again (STAGE=build or measure) within the warm window"; exit 0
  fi
  grep -E "^== |wrote|error|Error" $BLOG | tail -30
  [ "$(cat /tmp/sd35l-build.done)" = 0 ] || { echo "build failed: see log.txt (build.txt)"; exit 1; }
  for c in transformer text_encoder text_encoder_2 text_encoder_3 vae_decoder; do
    for d in $M $FUSED $FP8; do [ -f $d/$c/model.onnx ] || { echo "missing: $d/$c/model.onnx"; exit 1; }; done
  done
  echo "build: done ($(( $(date +%s) - t0 )) s in this call)"
fi
[ "$STAGE" = build ] && exit 0

if want time; then
  [ -f .ort-cuda/env.sh ] || { echo "carry .ort-cuda/env.sh and .ort-cuda/VERSION (every call that times)"; exit 1; }
  source .ort-cuda/env.sh
  [ -f "$(dirname "${ORT_DYLIB_PATH:-/opt/ort/x}")/libonnxruntime_providers_cuda.so" ] \
    || { echo "the CUDA bundle is not complete: carry its other pieces (.ort-cuda/parts/a or b)"; exit 1; }
  [ -x "$BIN" ] || { echo "no benchmark binary: carry .device-bin/benchmark.xz"; exit 1; }
  # which row is which (table.py's own names for sd35l are round 10's 8-block graphs)
  cat > "$OUT/notes.json" <<'EOF'
{"sd35l": " (SD3.5-large, 38 blocks, stock operators)",
 "sd35l-fused": " (SD3.5-large, 38 blocks, --fused-kernels)",
 "sd35l-fp8": " (SD3.5-large, 38 blocks, --fused-kernels --fp8: E4M3 block products)"}
EOF
  VARIANTS="sd35l-fused sd35l-fp8"; [ "${STOCK:-0}" = 1 ] && VARIANTS="$VARIANTS sd35l"
  for v in $VARIANTS; do
    [ "${OURS:-1}" = 1 ] || break
    [ -f "$OUT/ours-$v.json" ] && { echo "== ours: $v: done before"; continue; }
    echo "== ours: $v ($(date +%T))"
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "/tmp/sd35l-mem-$v.txt" &
    poll=$!
    timeout ${OURS_TIMEOUT:-300} "$BIN" --model /tmp/$v --ep cuda --width 1024 --height 1024 --steps 28 \
      --guidance 7 --runs ${RUNS:-2} --warmup 1 --json "$OUT/ours-$v.json" --output "$OUT/ours-$v.png" \
      --latents "$OUT/latents-$v.f32" 2>&1 | tail -16 | tee "$OUT/ours-$v.log"
    kill $poll 2>/dev/null; sleep 0.2
    peak=$(sort -n "/tmp/sd35l-mem-$v.txt" | tail -1)
    if [ -n "$peak" ]; then echo "$(( peak - idle )) MiB (peak minus idle $idle MiB)"; else echo "not sampled"; fi \
      | tee "$OUT/peak-$v.txt"
    python3 scripts/gpu/table.py "$OUT" > "$OUT/table.md"; collect
  done
  if [ "${TORCH:-1}" = 1 ] && [ ! -f "$OUT/torch.json" ]; then
    echo "== diffusers, transformer only ($(date +%T))"
    # --init-on-device: the random weights drawn on the GPU (same config, other values; speed does not depend on
    # them), not built on the CPU first; TORCH_SAME_WEIGHTS=1 builds the export's very weights (1-2 min more)
    timeout ${TORCH_TIMEOUT:-480} python3 scripts/gpu/bench_torch.py --variant sd3.5-large --transformer-only \
      $([ "${TORCH_SAME_WEIGHTS:-0}" = 1 ] || echo --init-on-device) --modes ${TORCH_MODES:-eager,compile} \
      --iters ${TORCH_ITERS:-10} --tokenizers-from models/fixtures/tiny-sd3 --json "$OUT/torch.json" 2>&1 \
      | grep -v Warning | tail -8 | tee "$OUT/torch.log"
  fi
  python3 scripts/gpu/table.py "$OUT" | tee "$OUT/table.md"
fi
if want check; then
  python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/check.txt"
import os, sys
import numpy as np
from PIL import Image
d = sys.argv[1]
def img(n):
    p = os.path.join(d, n)
    return np.asarray(Image.open(p)).astype(np.float64) if os.path.exists(p) else None
def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
for x, what in [("sd35l-fp8", "FP8"), ("sd35l", "stock operators")]:
    a, b = img(f"ours-{x}.png"), img("ours-sd35l-fused.png")
    if a is None or b is None:
        print(f"{what} vs float16 fused image: missing image"); continue
    e = np.abs(a - b)
    print(f"SD3.5-large 1024x1024 28 steps, {what} vs float16 fused image: max {e.max():.0f} levels, "
          f"mean {e.mean():.3f}, PSNR {psnr(a, b):.2f} dB")
    la, lb = (os.path.join(d, f"latents-{v}.f32") for v in (x, "sd35l-fused"))
    if os.path.exists(la) and os.path.exists(lb):
        p, q = np.fromfile(la, "<f4"), np.fromfile(lb, "<f4")
        e = np.abs(p - q)
        print(f"  final latents: max |diff| {e.max():.4g}, mean {e.mean():.4g} (float16 fused latents' mean |value| "
              f"{np.abs(q).mean():.4g}; relative mean {e.mean() / np.abs(q).mean():.4g})")
PY
fi
echo "total: $(( $(date +%s) - t0 )) s"
