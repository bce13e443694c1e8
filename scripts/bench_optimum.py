#!/usr/bin/env python3
"""End-to-end CPU benchmark of optimum's ORTStableDiffusion3Pipeline on the committed tiny fixtures.

The Python counterpart of `cargo bench --bench pipeline` (benches/pipeline.rs): the same fixture folders, the
same golden requests (prompt, size, steps, guidance, and the explicit initial latents from latents.npy), the
CPU execution provider, ONNX Runtime's default thread settings unless --threads sets intra-op threads (pass the
same number to both sides). Each fixture is loaded once (load time reported separately), every case is warmed
up, then generated --runs times with output_type="pil". The JSON it writes has the fields the Rust bench writes.

What is timed per generation:
  total_ms          pipe(...) from call to PIL image (diffusers' __call__ with optimum's ORT models).
  onnx_ms           time inside ONNX Runtime: every graph's InferenceSession._sess.run (the pybind call into
                    the C++ session; it includes pybind's numpy <-> OrtValue conversion of inputs and outputs,
                    which ours does outside Session::run, so this slightly overstates optimum's ORT time).
  outside_ms        total_ms - onnx_ms: tokenizers, torch <-> numpy conversions, scheduler, guidance, image
                    post-processing, Python interpreter overhead.
  text_encoding_ms  inside pipe.encode_prompt (prompt and, with CFG, negative prompt; all three encoders).
  denoising_ms      from encode_prompt's return to the VAE decode call (latents, schedule, the step loop).
  vae_ms            vae.decode plus image_processor.postprocess (to PIL).

Usage: python scripts/bench_optimum.py [--runs N] [--warmup N] [--threads N] [--fixtures A,B] [--cases A,B]
           [--save-json PATH] [--save-images DIR]
(the same settings can come from SD3_BENCH_RUNS, SD3_BENCH_WARMUP, SD3_BENCH_THREADS, SD3_BENCH_FIXTURES,
SD3_BENCH_CASES; the Python environment comes from `bash models/setup-python.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The fixture whose golden requests are borrowed by fixtures without goldens of their own (as in the Rust bench).
REQUEST_SOURCE = "tiny-sd3"


def env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name, "").strip()
    return v if v else default


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=int(env("SD3_BENCH_RUNS", "100")))
    ap.add_argument("--warmup", type=int, default=int(env("SD3_BENCH_WARMUP", "5")))
    t = env("SD3_BENCH_THREADS")
    ap.add_argument("--threads", type=int, default=int(t) if t else None,
                    help="ONNX Runtime intra-op threads (default: ONNX Runtime's default)")
    ap.add_argument("--fixtures", default=env("SD3_BENCH_FIXTURES", "tiny-sd3,tiny-sd35"))
    ap.add_argument("--cases", default=env("SD3_BENCH_CASES", "cfg_negative,guidance_1"))
    ap.add_argument("--save-json", type=Path, default=None)
    ap.add_argument("--save-images", type=Path, default=None, help="folder for the first image of every case")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    if a.threads is not None and a.threads < 1:
        ap.error("--threads must be at least 1 (leave it out for ONNX Runtime's default)")
    a.fixtures = [s.strip() for s in a.fixtures.split(",") if s.strip()]
    a.cases = [s.strip() for s in a.cases.split(",") if s.strip()]
    return a


def read_case(fixture: str, name: str):
    own = REPO / "models" / "goldens" / fixture / name
    if (own / "request.json").is_file():
        folder, golden = own, (own / "optimum.png" if (own / "optimum.png").is_file() else None)
    else:
        folder, golden = REPO / "models" / "goldens" / REQUEST_SOURCE / name, None
    req = json.loads((folder / "request.json").read_text())
    latents = np.load(folder / req.get("latents", "latents.npy")).astype(np.float32)
    return folder, golden, req, latents


def stats(samples: list[float]) -> dict:
    return dict(median=statistics.median(samples), mean=statistics.fmean(samples), min=min(samples),
                max=max(samples), samples=samples)


def pixel_diff(a: np.ndarray, b: np.ndarray):
    if a.shape != b.shape:
        return None
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(d.max()), float(d.mean())


class Clock:
    """Accumulates seconds."""

    def __init__(self):
        self.seconds = 0.0


class TimedSession:
    """Stands in for InferenceSession._sess (the pybind session) and times its run calls."""

    def __init__(self, inner, clock: Clock):
        self._inner = inner
        self._clock = clock

    def _timed(self, name, *args, **kwargs):
        t = time.perf_counter()
        try:
            return getattr(self._inner, name)(*args, **kwargs)
        finally:
            self._clock.seconds += time.perf_counter() - t

    def run(self, *args, **kwargs):
        return self._timed("run", *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed("run_with_iobinding", *args, **kwargs)

    def run_with_ortvaluevector(self, *args, **kwargs):
        return self._timed("run_with_ortvaluevector", *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class StageTimer:
    """Wraps encode_prompt, vae.decode and image_processor.postprocess of one pipeline to time the stages."""

    def __init__(self, pipe):
        self.reset()
        enc, dec, post = pipe.encode_prompt, pipe.vae.decode, pipe.image_processor.postprocess

        def encode_prompt(*a, **k):
            t = time.perf_counter()
            try:
                return enc(*a, **k)
            finally:
                self.text_end = time.perf_counter()
                self.text += self.text_end - t

        def decode(*a, **k):
            self.vae_start = time.perf_counter()
            return dec(*a, **k)

        def postprocess(*a, **k):
            try:
                return post(*a, **k)
            finally:
                self.vae_end = time.perf_counter()

        pipe.encode_prompt = encode_prompt
        pipe.vae.decode = decode
        pipe.image_processor.postprocess = postprocess

    def reset(self):
        self.text = 0.0
        self.text_end = self.vae_start = self.vae_end = None


def main() -> int:
    args = parse_args()
    import onnxruntime as ort
    import torch
    from PIL import Image

    import diffusers
    from optimum.onnxruntime import ORTStableDiffusion3Pipeline

    try:
        from importlib.metadata import version

        optimum_version = version("optimum-onnx")
    except Exception:  # noqa: BLE001 - only for the report
        optimum_version = "?"

    so = ort.SessionOptions()
    if args.threads is not None:
        so.intra_op_num_threads = args.threads
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)

    results, rows, loads = [], [], {}
    for fixture in args.fixtures:
        folder = REPO / "models" / "fixtures" / fixture
        if not folder.is_dir():
            print(f"skipping {fixture}: {folder} does not exist", file=sys.stderr)
            continue
        t = time.perf_counter()
        pipe = ORTStableDiffusion3Pipeline.from_pretrained(folder, provider="CPUExecutionProvider",
                                                           session_options=so)
        load_ms = (time.perf_counter() - t) * 1e3
        loads[fixture] = load_ms
        print(f"{fixture}: loaded in {load_ms:.1f} ms", file=sys.stderr)
        # tqdm's progress bar is not part of the pipeline's work; a benchmark turns it off.
        pipe.set_progress_bar_config(disable=True)
        clock = Clock()
        providers = set()
        for comp in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"):
            model = getattr(pipe, comp, None)
            if model is None:
                continue
            providers.update(model.session.get_providers()[:1])
            model.session._sess = TimedSession(model.session._sess, clock)
        stages = StageTimer(pipe)

        for name in args.cases:
            req_dir, golden, req, latents = read_case(fixture, name)
            label = f"{fixture}/{name}"
            channels = pipe.transformer.config.in_channels
            if latents.shape[1] != channels:
                print(f"skipping {label}: latents have {latents.shape[1]} channels, the model {channels}",
                      file=sys.stderr)
                continue
            kwargs = dict(prompt=req["prompt"], negative_prompt=req.get("negative_prompt") or None,
                          width=req["width"], height=req["height"], num_inference_steps=req["steps"],
                          guidance_scale=req["guidance"], max_sequence_length=req.get("max_sequence_length", 256),
                          output_type="pil")
            base = torch.from_numpy(latents)

            def generate():
                lat = base.clone()  # outside the timed region, like building the request on the Rust side
                stages.reset()
                before = clock.seconds
                t0 = time.perf_counter()
                image = pipe(latents=lat, **kwargs).images[0]
                t1 = time.perf_counter()
                total = t1 - t0
                onnx = clock.seconds - before
                rec = dict(total=total * 1e3, onnx=onnx * 1e3, outside=(total - onnx) * 1e3,
                           share=(total - onnx) / total, text=stages.text * 1e3,
                           denoise=(stages.vae_start - stages.text_end) * 1e3,
                           vae=(stages.vae_end - stages.vae_start) * 1e3)
                return image, rec

            first, _ = generate()
            for _ in range(1, args.warmup):
                generate()
            series = {k: [] for k in ("total", "onnx", "outside", "share", "text", "denoise", "vae")}
            for _ in range(args.runs):
                _, rec = generate()
                for k, v in rec.items():
                    series[k].append(v)

            img = np.asarray(first.convert("RGB"), dtype=np.uint8)
            gmax = gmean = None
            if golden is not None:
                d = pixel_diff(img, np.asarray(Image.open(golden).convert("RGB"), dtype=np.uint8))
                if d is None:
                    print(f"{label}: image size differs from {golden}", file=sys.stderr)
                else:
                    gmax, gmean = d
                    print(f"{label}: first image vs {golden}: max diff {gmax}, mean {gmean:.4f} (8-bit levels)",
                          file=sys.stderr)
            else:
                print(f"{label}: no golden image for this fixture (request from {req_dir})", file=sys.stderr)
            saved = None
            if args.save_images:
                saved = args.save_images / f"{fixture}__{name}.png"
                first.save(saved)
            tot = stats(series["total"])
            print(f"{label}: median {tot['median']:.2f} ms over {args.runs} runs (min {tot['min']:.2f}, "
                  f"mean {tot['mean']:.2f})", file=sys.stderr)
            cfg = req["guidance"] > 1.0
            results.append(dict(
                fixture=fixture, case=name, request_dir=str(req_dir), steps=req["steps"], guidance=req["guidance"],
                cfg=cfg, width=first.width, height=first.height, load_ms=load_ms, warmup=args.warmup,
                runs=args.runs, total_ms=tot, onnx_ms=stats(series["onnx"]), outside_ms=stats(series["outside"]),
                outside_share=statistics.median(series["share"]), text_encoding_ms=stats(series["text"]),
                denoising_ms=stats(series["denoise"]), vae_ms=stats(series["vae"]),
                image=str(saved) if saved else None, golden=str(golden) if golden else None,
                golden_max_diff=gmax, golden_mean_diff=gmean, providers=sorted(providers)))
            rows.append((fixture, name, req["steps"], cfg, series))
    if not rows:
        print("error: nothing was benchmarked", file=sys.stderr)
        return 1

    threads = f"intra-op {args.threads}" if args.threads else \
        "ONNX Runtime default (intra-op 0 = one per physical core, sequential executor)"
    print()
    print(f"optimum-onnx {optimum_version} ORTStableDiffusion3Pipeline (diffusers {diffusers.__version__}), "
          f"CPUExecutionProvider, {args.runs} timed runs per case after {args.warmup} warm-up, onnxruntime "
          f"{ort.__version__}, threads: {threads}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    print()
    for f, l in loads.items():
        print(f"- {f}: load {l:.1f} ms")
    print()
    print("| fixture | case | steps | CFG | median ms | mean ms | min ms | ORT median ms | outside median ms "
          "| outside share | text enc. ms | denoising ms | VAE ms |")
    print("|---|---|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    for fixture, name, steps, cfg, s in rows:
        print(f"| {fixture} | {name} | {steps} | {'yes' if cfg else 'no'} | {med(s['total']):.2f} | "
              f"{statistics.fmean(s['total']):.2f} | {min(s['total']):.2f} | {med(s['onnx']):.2f} | "
              f"{med(s['outside']):.2f} | {100 * med(s['share']):.1f} % | {med(s['text']):.2f} | "
              f"{med(s['denoise']):.2f} | {med(s['vae']):.2f} |")
    print()
    print("ORT = time inside InferenceSession._sess.run (pybind, includes numpy <-> OrtValue conversion); "
          "outside share = median over runs of (total - ORT) / total.")

    if args.save_json:
        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(implementation="optimum-onnx ORTStableDiffusion3Pipeline", language="python",
                   optimum_onnx=optimum_version, diffusers=diffusers.__version__, torch=torch.__version__,
                   torch_threads=torch.get_num_threads(), onnxruntime=ort.__version__,
                   onnxruntime_library=str(Path(ort.__file__).parent / "capi"),
                   threads=dict(intra_op=args.threads, inter_op=None), warmup=args.warmup, runs=args.runs,
                   loads_ms=loads, results=results)
        args.save_json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.save_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
