#!/usr/bin/env bash
# On the GPU machine (see ../shared/device/README.md): trains the nano SD3 and puts the result under $OUT.
#   carry: .whl-nano (models/nano/requirements.txt's pure-Python and cp312 wheels, fetched by fetch_wheels.sh)
#          and, to continue from an earlier call, .nano-resume.tgz (that call's $OUT/pipeline.tgz), extracted to
#          /tmp/resume: pass --resume /tmp/resume/pipeline or --init-from /tmp/resume/pipeline
#   TRAIN_LIMIT=seconds bash models/nano/device_train.sh [train.py options]
# Fine-tune of issue 22 (one call, about 9 minutes): .nano-resume.tgz from prepare_finetune.sh, then
#   TRAIN_LIMIT=540 bash models/nano/device_train.sh --init-from-onnx /tmp/resume/pipeline --split train4 ...
#   (the exact options: README.md, "Fine-tune on pairs"); FINETUNE=1 picks them (below).
# The device image's own torch is used (its version is recorded in train_log.json); diffusers, transformers,
# tokenizers, huggingface_hub and Pillow come from the carried wheels, pinned as here. train.py runs under
# `timeout $TRAIN_LIMIT` (default 540 s) and ends its training 30 s before that (--stop-by; a fresh machine's first
# torch.compile took 70 s where a warm one took 8 s, and a run that timed out in training lost everything); it saves
# the pipeline before its evaluation, so a run cut short there still brings the weights back.
set -uo pipefail
# NANO_SITE: where the wheels go (default /tmp/site); another folder keeps them apart from a diffusers 0.42.1 that
# another job on the same machine (scripts/gpu/build_sd3m.sh) imports from /tmp/site.
SITE=${NANO_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl-nano/*.whl \
  && export PYTHONPATH="$SITE" || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nano-out}
RUN=${RUN:-.nano-run}
mkdir -p "$OUT" "$RUN"
if [ -f .nano-resume.tgz ]; then mkdir -p /tmp/resume && tar -C /tmp/resume -xzf .nano-resume.tgz; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, transformers, PIL, numpy; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "Pillow", PIL.__version__, "numpy", numpy.__version__)' | tee -a "$OUT/gpu.txt"
LIMIT=${TRAIN_LIMIT:-540}
if [ "${FINETUNE:-0}" = 1 ]; then
  # issue 22: VAE encoder against the committed decoder (75 s, with 2048 latents the model draws itself for the
  # cycle term), then transformer + text encoders on train4 (the cosine spans the 275 s left before --stop-by after
  # rendering, tokenizing, the encoder and torch.compile)
  set -- --init-from-onnx /tmp/resume/pipeline --split train4 --n-train 150000 --seed 22 --t5-len 77 \
    --infer-shift 3 --enc-seconds 75 --enc-batch 128 --enc-lr 1e-3 --enc-cycle 2048 --dit-batch 256 \
    --dit-lr 3e-4 --dit-seconds 275 --schedule-seconds 275 --warmup 100 --compile --eval "$@"
fi
if [ "${RETRAIN:-0}" = 1 ]; then
  # issue 22, run 16 on: the shipped VAE (prepare_retrain.sh) kept as it is; new text encoders (CLIP-shaped 64 x 3
  # layers, T5-shaped 128 x 4) and a new transformer two blocks deeper than the first model's (8 x 128: run 15
  # drew pairs with swapped colours and reversed relations although its CLIP-L states bind each shape to its
  # colour, probe_binding.py: the transformer has to learn to use that), on train4 at batch 1,024 (the H200's
  # samples per second level off there: run 15's probes). The caller gives --dit-seconds, --schedule-seconds and
  # --stop-by for the session's device time.
  set -- --vae-from /tmp/resume/pipeline --split train4 --n-train 400000 --seed 16 --t5-len 77 --infer-shift 3 \
    --clip-width 64 --clip-layers 3 --t5-width 128 --t5-layers 4 --dit-layers 8 --dit-heads 4 --dit-head-dim 32 \
    --patch-size 1 --dit-batch 1024 --dit-lr 1e-3 --dit-steps 100000000 --warmup 500 --compile --eval \
    --eval-train-pairs 120 "$@"
fi
if [ "${CONTINUE:-0}" = 1 ]; then
  # issue 22, run 17 on: run 16's pipeline (its pipeline.tgz from the collect call, as .nano-resume.tgz) trained
  # further: its loss was still falling when run 16's session ended (0.0808 at step 6,000, 0.0746 at 8,673). Split
  # train5 (train4 plus same-shape relation pairs: run 16 put the held-out side x shape prompts in the wrong
  # relation), same batch, new scenes (seed 17), a new warmup to half run 16's peak rate. The sizes come from the
  # saved configs; --eval-train-pairs-seed 793 (16 + 777) scores run 16's 120 training-distribution pairs again.
  # The caller gives --dit-seconds, --schedule-seconds and --stop-by (and --split train4 to continue on train4).
  set -- --resume /tmp/resume/pipeline --split train5 --n-train 400000 --seed 17 --t5-len 77 --infer-shift 3 \
    --dit-batch 1024 --dit-lr 5e-4 --dit-steps 100000000 --warmup 300 --compile --eval --eval-train-pairs 120 \
    --eval-train-pairs-seed 793 "$@"
fi
# NPROC=N (a machine of N GPUs, e.g. kind nvidia-h100-x8): N data-parallel processes under torchrun (train.py's
# class Dist: --dit-batch per process, the gradients averaged; the VAE must come with --vae-from / --resume /
# --init-from), each rendering with its share of the CPUs (at most 16).
NPROC=${NPROC:-1}
# NVLink multicast stays off (the device README: it can take a shared host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORKERS=$(( $(nproc) / NPROC )); [ "$WORKERS" -gt 16 ] && WORKERS=16; [ "$WORKERS" -lt 1 ] && WORKERS=1
if [ "$NPROC" -gt 1 ]; then
  # each process's torch.compile gets its share of the cores too (inductor's default is one worker per core)
  export TORCHINDUCTOR_COMPILE_THREADS=$WORKERS
  LAUNCH=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=(python3)
fi
timeout --signal=INT "$LIMIT" "${LAUNCH[@]}" models/nano/train.py --out "$RUN" --workers "$WORKERS" \
  --stop-by $((LIMIT - 30)) "$@" 2>&1 | grep -v -i warn | tee "$OUT/train.log"
cp "$RUN"/train_log.json "$RUN"/clip_token_ids.json "$RUN"/eval_*.png "$OUT"/ 2>/dev/null
# the float16 pipeline without its tokenizers (they come from the repository), in pieces under 16 MiB
if [ -d "$RUN/pipeline/transformer" ]; then
  tar -C "$RUN" --exclude='pipeline/tokenizer*' -czf /tmp/pipeline.tgz pipeline && split -b 15M /tmp/pipeline.tgz "$OUT/pipeline.tgz.part-"
fi
ls -la "$OUT"
