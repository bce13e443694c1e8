#!/usr/bin/env bash
# On the GPU machine: one device session for issue 19, call by call (PHASE=...), each call within the machine's
# warm window of the one before (what a call carried stays in the working tree; /tmp and /opt persist).
#   start    stash the CUDA bundle's pieces carried so far, install diffusers (.whl) into /tmp/site, unpack the
#            carried binaries (.device-bin/*.xz) into /tmp/r19-bin, and start the builds as one background chain
#            (setsid: it outlives the call), CPU cores 4.. at nice 19 so that measurements keep cores 0-3:
#              chain 1: fp8.sh STAGE=build (/tmp/sd3m, -fused, -fp8, -fp8s);
#              chain 3 (at the same time): sd35m.sh STAGE=build (/tmp/sd35m, -fused); SD35M=0 leaves it out;
#            and, when scripts/gpu/sd35l.sh exists and SD35L=1, its build in chain 2 (then SD3.5-medium's build
#            waits for chain 1 and for disk room, in chain 1).
#   status   the chains' logs, disk and memory (any call may add STATUS=1 to print this first).
#   tiny     (needs the whole bundle) the lib tests on CUDA: the FP8 kernels against the Python emulation, the
#            GPU RGB conversion against the host's, then the tiny FP8 fixtures (fp8.sh's check 1-2 are repeated by
#            PHASE=fp8; this phase is for the minutes while the builds run).
#   fp8      fp8.sh STAGE=measure (waits for /tmp/sd3m-fp8); FP8_STAGE=check or time splits it.
#   loop     device_loop.sh on sd3m-fused (host loop vs device loop, CUDA graphs when the binary has them).
#   sd35m    sd35m.sh STAGE=measure.   sd35l   sd35l.sh STAGE=measure.   nano   nano_fp8.sh.
#   vae      vae.sh: the dynamo and TorchScript VAE decoders timed on the same latents (needs /tmp/sd3m-fused).
#   malloc   the outside-ONNX-Runtime rows of /tmp/sd3m-fused with glibc's default malloc and with GLIBC_TUNABLES
#            that keep freed memory (first-touch page faults of fresh host buffers; about a minute).
# Results: $OUT of each call (at most 8 files; each phase script picks its own).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PHASE=${PHASE:-status}
[ -f .ort-cuda/env.sh ] && ( source .ort-cuda/env.sh )
BIN=/tmp/r19-bin; mkdir -p "$BIN"
for f in .device-bin/*.xz; do
  [ -f "$f" ] || continue
  b=$(basename "$f" .xz)
  if [ ! -x "$BIN/$b" ] || [ "$f" -nt "$BIN/$b" ]; then
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$BIN/$b" && chmod +x "$BIN/$b"
  fi
  # the other scripts look for their binaries in .device-bin: leave the unpacked copy there too
  cp -p "$BIN/$b" ".device-bin/$b" 2>/dev/null
done
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
fi
status() {
  echo "== status $(date +%T)"
  for f in /tmp/r19-chain1.log /tmp/r19-chain2.log /tmp/r19-chain3.log; do [ -f "$f" ] && { echo "-- $f"; tail -6 "$f"; }; done
  [ -f /tmp/sd35l-build.log ] && { echo "-- /tmp/sd35l-build.log"; grep -E '^== ' /tmp/sd35l-build.log | tail -3; }
  ls -d /tmp/sd3m* /tmp/sd35m* /tmp/sd35l* 2>/dev/null | while read -r d; do
    [ -f "$d/transformer/model.onnx" ] && echo "built: $d"
  done
  df -h /tmp | tail -1; free -g | sed -n 2p
}
[ "${STATUS:-0}" = 1 ] && status
cores=$(nproc); build_cpus="4-$(( cores - 1 ))"
# A machine that went back while idle comes back bare: every phase but start would then rebuild (or wait) in the
# wrong place. Say so at once (2026-12-03: a fifth call after an interruption found a fresh machine and its
# device time went into a build that could not start).
if [ "$PHASE" != start ] && [ "$PHASE" != status ] && [ "$PHASE" != nano ] && [ ! -f /tmp/r19-chain1.started ]; then
  echo "this machine is fresh (no PHASE=start ran on it): run PHASE=start with .whl, .device-bin and the bundle first"
  exit 3
fi
case "$PHASE" in
  start)
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
    if [ ! -f /tmp/r19-chain1.started ]; then
      touch /tmp/r19-chain1.started
      setsid nohup taskset -c "$build_cpus" nice -n 19 bash -c '
        t=$(date +%s)
        BUILD_WAIT=1500 STAGE=build OUT=/tmp/r19-fp8-build bash scripts/gpu/fp8.sh; echo "fp8 build: $(( $(date +%s) - t )) s"
        [ "${SD35M:-1}" = 1 ] && [ "${SD35L:-0}" = 1 ] || { echo "chain1 done"; exit 0; }
        # with SD35L=1 the SD3.5-large build shares the disk (its float32 export peaks near 33 GB): wait for room,
        # then build SD3.5-medium after SD3-medium (without SD35L it runs beside it, in chain 3)
        for ((i = 0; i < 900; i += 10)); do
          [ "$(df -P -BG /tmp | awk '"'"'NR==2 {gsub("G", "", $4); print $4}'"'"')" -ge ${SD35M_NEED_GB:-20} ] && break; sleep 10
        done; df -h /tmp | tail -1
        BUILD_WAIT=1500 STAGE=build OUT=/tmp/r19-sd35m-build bash scripts/gpu/sd35m.sh; echo "sd35m build: $(( $(date +%s) - t )) s"
        echo chain1 done' > /tmp/r19-chain1.log 2>&1 < /dev/null &
    fi
    # SD3.5-medium beside SD3-medium (2026-12-04: the exports are mostly one thread each; 12 build cores, 128 GB
    # of RAM and 64 GB of disk hold both; build_sd3m.sh's BUILD_TAG keeps their job files apart)
    if [ "${SD35M:-1}" = 1 ] && [ "${SD35L:-0}" != 1 ] && [ ! -f /tmp/r19-chain3.started ]; then
      touch /tmp/r19-chain3.started
      setsid nohup taskset -c "$build_cpus" nice -n 19 bash -c '
        t=$(date +%s); BUILD_WAIT=1500 STAGE=build OUT=/tmp/r19-sd35m-build bash scripts/gpu/sd35m.sh
        echo "sd35m build: $(( $(date +%s) - t )) s"; echo chain3 done' > /tmp/r19-chain3.log 2>&1 < /dev/null &
    fi
    if [ "${SD35L:-0}" = 1 ] && [ -f scripts/gpu/sd35l.sh ] && [ ! -f /tmp/r19-chain2.started ]; then
      touch /tmp/r19-chain2.started
      setsid nohup taskset -c "$build_cpus" nice -n 19 bash -c '
        t=$(date +%s); BUILD_WAIT=2400 STAGE=build OUT=/tmp/r19-sd35l-build bash scripts/gpu/sd35l.sh
        echo "sd35l build: $(( $(date +%s) - t )) s"; echo chain2 done' > /tmp/r19-chain2.log 2>&1 < /dev/null &
    fi
    sleep 5; status ;;
  status) status ;;
  tiny)
    source .ort-cuda/env.sh
    bash scripts/gpu/cuda_lib_tests.sh "$BIN/sd3onnx-lib-tests" 2>&1 | tee "$OUT/tiny.txt"
    status > "$OUT/status.txt" ;;
  fp8)
    # wait (at most FP8_WAIT s) for the FP8 folder of chain 1
    for ((i = 0; i < ${FP8_WAIT:-400}; i += 10)); do [ -f /tmp/sd3m-fp8/transformer/model.onnx ] && break; sleep 10; done
    # and (at most FP8S_WAIT s, default 0) for the static-scale variant, whose calibration may still run
    for ((i = 0; i < ${FP8S_WAIT:-0}; i += 10)); do [ -f /tmp/sd3m-fp8s/transformer/model.onnx ] && break; sleep 10; done
    FULL_CHECK=${FULL_CHECK:-0} SKIP_LIB=${SKIP_LIB:-1} STAGE=${FP8_STAGE:-measure} RUNS=${RUNS:-2} bash scripts/gpu/fp8.sh
    status > "$OUT/status.txt" ;;
  loop)
    CUDA_GRAPH=${CUDA_GRAPH:-1} VARIANTS=${VARIANTS:-sd3m-fused} RUNS=${RUNS:-2} bash scripts/gpu/device_loop.sh
    status > "$OUT/status.txt" ;;
  sd35m)
    for ((i = 0; i < ${SD35M_WAIT:-300}; i += 10)); do [ -f /tmp/sd35m-fused/transformer/model.onnx ] && break; sleep 10; done
    STAGE=${SD35M_STAGE:-measure} RUNS=${RUNS:-2} bash scripts/gpu/sd35m.sh ;;
  sd35l) STAGE=measure RUNS=${RUNS:-2} bash scripts/gpu/sd35l.sh ;;
  nano) MODES=${MODES:-cfg} bash scripts/gpu/nano_fp8.sh ;;
  vae) bash scripts/gpu/vae.sh ;;
  malloc)
    # Our time outside ONNX Runtime with glibc's default malloc and with one that neither returns memory to the
    # system nor maps large blocks apart (GLIBC_TUNABLES): the difference is, most likely, what first-touch page
    # faults of fresh host buffers cost each image (not counted). On the 2-core CPU (2026-12-04, 1024x1024, 1-layer SD3-medium-width
    # folder, CPU provider) it was 22.85 -> 10.64 ms (text encoding's host side 8.76 -> 2.13).
    source .ort-cuda/env.sh
    for ((i = 0; i < ${FUSED_WAIT:-300}; i += 10)); do [ -f /tmp/sd3m-fused/transformer/model.onnx ] && break; sleep 10; done
    for mode in default tunables; do
      env=(); [ "$mode" = tunables ] && env=(GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184)
      echo "== malloc: $mode ($(date +%T))"
      env "${env[@]}" timeout 300 "$BIN/benchmark" --model /tmp/sd3m-fused --ep cuda --width 1024 --height 1024 --steps 28 \
        --guidance 7 --runs ${RUNS:-3} --warmup 1 --loop device --json "$OUT/malloc-$mode.json" 2> "$OUT/malloc-$mode.err" \
        | grep -E "end to end|outside|step graphs|VmHWM" | tee "$OUT/malloc-$mode.md"
    done ;;
  *) echo "PHASE: start | status | tiny | fp8 | loop | sd35m | sd35l | nano | vae | malloc"; exit 2 ;;
esac
