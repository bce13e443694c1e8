#!/usr/bin/env python3
"""Trains the nano SD3: a 16-channel VAE, CLIP-L-, CLIP-G- and T5-shaped text encoders and an MMDiT, on the synthetic
captioned images of `scenes.py`, with the SD3 paper's recipe scaled down (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis"):

- rectified flow: x_t = (1 - t) x0 + t eps, the transformer predicts v = eps - x0 (diffusers'
  `FlowMatchEulerDiscreteScheduler` samples the same ODE; training_utils.compute_density_for_timestep_sampling
  "logit_normal" draws t the same way);
- timesteps from a logit-normal distribution, t = sigmoid(n), n ~ N(m, s) (paper sec. 3.1, eq. 19; m = 0, s = 1);
- the transformer gets `timestep = 1000 t` (`FlowMatchEulerDiscreteScheduler.timesteps = sigmas * 1000`);
- conditioning exactly as `StableDiffusion3Pipeline.encode_prompt`: CLIP-L and CLIP-G penultimate hidden states
  concatenated on the feature axis and zero-padded to T5's width, then T5's last hidden state appended on the sequence
  axis; pooled = CLIP-L text_embeds ++ CLIP-G text_embeds;
- caption dropout: the caption is replaced by "" (what the pipeline encodes as the negative prompt) with probability
  `--caption-dropout` (0.1), which trains the unconditional branch of classifier-free guidance;
- text encoders trained jointly with the transformer from random initialisation (the real CLIP BPE vocabulary and the
  fixtures' T5 sentencepiece vocabulary);
- VAE first (L1 + L2 reconstruction + a small KL term), then latents cached; `shift_factor` / `scaling_factor` are the
  mean and 1/std of the cached latents (SD3's VAE config holds the same two numbers, 0.0609 / 1.5305, for its data);
- an EMA of the transformer and text encoder weights is what gets saved.

Everything runs on one GPU in a few minutes. Seeded (`--seed`); GPU kernels are not bitwise deterministic.
Writes a diffusers StableDiffusion3Pipeline folder (`--out`) that `models/export/export_sd3.py --model` exports, plus
`train_log.json` (losses, timings, the card) and, with `--eval`, images of the held-out prompts drawn by the PyTorch
model with a plain Euler sampler and their adherence (models/nano/checker.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenes  # noqa: E402

T0 = time.time()


class Dist:
    """Data-parallel training over the GPUs of one host, as `torchrun --nproc_per_node N train.py ...` starts it
    (RANK, WORLD_SIZE, LOCAL_RANK in the environment; without them, one process and none of this does anything).

    Every process holds the whole data set (rendered and tokenized from the same seed) and the same initial weights,
    and draws the same *global* batch of `world x --dit-batch` samples from the same generator, of which it computes
    its own slice. The gradients (and the loss, for the logs) are summed over the processes and divided by their
    number: with equal slices, the gradient of the global batch's mean loss, so N processes train the weights that
    one process with the global batch would (up to the order of float additions: test_ddp.py). Rank 0's clock
    decides the learning rate and when to stop (broadcast every 10th step), so no process can leave the loop alone;
    rank 0 alone writes files, measures the VAE's held-out PSNR and evaluates."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                if self.local >= torch.cuda.device_count():
                    raise SystemExit(f"rank {self.rank}: LOCAL_RANK {self.local} but only "
                                     f"{torch.cuda.device_count()} GPUs: start at most that many processes per host")
                torch.cuda.set_device(self.local)
            dist.init_process_group(backend)
            self.group = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device("cuda", self.local) if torch.cuda.is_available() else torch.device("cpu")

    def mean_grads(self, params, loss):
        """Sums the gradients of `params` (those that have one: the same set in every process) and `loss` over the
        processes and divides by their number, in one flat buffer; returns the mean loss (a tensor)."""
        if self.world == 1:
            return loss.detach()
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().float().reshape(1)])
        self.group.all_reduce(flat)
        flat.div_(self.world)
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        return flat[-1]

    def control(self, dev, *values):
        """Rank 0's `values` (floats) in every process."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        self.group.broadcast(t, 0)
        return tuple(t.tolist())

    def finish(self):
        if self.world > 1:
            self.group.destroy_process_group()
            self.world = 1


DIST = None  # set in main()


def log(*a):
    if DIST is None or DIST.main:
        print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# model configurations (all widths here; nothing else in this file names a size)
# ---------------------------------------------------------------------------------------------------------------

def configs(args):
    clip_common = dict(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        num_hidden_layers=args.clip_layers, num_attention_heads=2, attention_dropout=0.0, layer_norm_eps=1e-5,
    )
    clip_l = dict(clip_common, hidden_size=args.clip_width, intermediate_size=4 * args.clip_width,
                  projection_dim=args.clip_width, hidden_act="quick_gelu")  # CLIP-L uses quick_gelu
    clip_g = dict(clip_common, hidden_size=args.clip_width, intermediate_size=4 * args.clip_width,
                  projection_dim=args.clip_width, hidden_act="gelu")  # OpenCLIP bigG uses gelu
    t5 = dict(vocab_size=1152, d_model=args.t5_width, d_kv=args.t5_width // 4, num_heads=4, d_ff=2 * args.t5_width,
              num_layers=args.t5_layers, feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, is_encoder_decoder=False,
              use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    joint = args.t5_width
    assert 2 * args.clip_width <= joint, "CLIP-L + CLIP-G widths must fit in T5's width (they are zero-padded to it)"
    dit = dict(sample_size=args.image_size // 8, patch_size=args.patch_size, in_channels=16, out_channels=16,
               num_layers=args.dit_layers, attention_head_dim=args.dit_head_dim, num_attention_heads=args.dit_heads,
               joint_attention_dim=joint, caption_projection_dim=args.dit_heads * args.dit_head_dim,
               pooled_projection_dim=2 * args.clip_width, pos_embed_max_size=args.image_size // 8,
               qk_norm="rms_norm", dual_attention_layers=())
    vae = dict(in_channels=3, out_channels=3, latent_channels=16,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=tuple(int(c) for c in args.vae_channels.split(",")), layers_per_block=1,
               norm_num_groups=8, sample_size=args.image_size, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.0, shift_factor=0.0)
    return clip_l, clip_g, t5, dit, vae


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def load_tokenizers(tok_dir: Path):
    from transformers import CLIPTokenizerFast, T5TokenizerFast

    # The fast tokenizers give the slow CLIPTokenizer's ids on these ASCII captions (the Rust tests check our
    # tokenizer against transformers'); they are ~20x faster on 10^5 captions.
    tl = CLIPTokenizerFast.from_pretrained(tok_dir / "tokenizer")
    tg = CLIPTokenizerFast.from_pretrained(tok_dir / "tokenizer_2")
    t5 = T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_3")
    return tl, tg, t5


def _ids(tok, texts, length):
    """tok(texts, max_length=length, padding="max_length", truncation=True).input_ids as a tensor, through the Rust
    tokenizer's encode_batch (about 2x faster on 10^5 captions than the Python wrapper; the same ids, checked on the
    first 64 texts every call, else the wrapper's are used)."""
    kw = dict(max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    head = tok(list(texts[:64]), **kw).input_ids
    bt = copy.deepcopy(tok.backend_tokenizer)
    bt.enable_truncation(length)
    bt.enable_padding(length=length, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    ids = torch.from_numpy(np.array([e.ids for e in bt.encode_batch(list(texts))], dtype=np.int64))
    if ids.shape != (len(texts), length) or not torch.equal(ids[:64], head):
        return tok(list(texts), **kw).input_ids
    return ids


def tokenize(toks, texts, t5_len):
    """Token ids as StableDiffusion3Pipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds make them."""
    tl, tg, t5 = toks
    return _ids(tl, texts, 77), _ids(tg, texts, 77), _ids(t5, texts, t5_len)


# ---------------------------------------------------------------------------------------------------------------
# text conditioning (StableDiffusion3Pipeline.encode_prompt, diffusers 0.35.2 pipeline_stable_diffusion_3.py)
# ---------------------------------------------------------------------------------------------------------------

class TextStack(torch.nn.Module):
    def __init__(self, te1, te2, te3):
        super().__init__()
        self.te1, self.te2, self.te3 = te1, te2, te3

    def forward(self, ids_l, ids_g, ids_t):
        o1 = self.te1(ids_l, output_hidden_states=True)
        o2 = self.te2(ids_g, output_hidden_states=True)
        h = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)  # clip_skip=None -> hidden_states[-2]
        t5 = self.te3(ids_t)[0]
        h = F.pad(h, (0, t5.shape[-1] - h.shape[-1]))
        ctx = torch.cat([h, t5], dim=-2)
        pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
        return ctx, pooled


# ---------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------

def lr_at(progress, step, base, warmup):
    """Linear warm-up over `warmup` steps, then cosine from base to base/10 over the run's progress (0..1: the
    larger of steps done / step budget and seconds spent / time budget, so a time-limited run still anneals)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vae(vae, images, args, dev, logs):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    n = images.shape[0]
    t_start = time.time()
    step = 0
    hist = []
    while step < args.vae_steps and time.time() - t_start < args.vae_seconds:
        for pg in opt.param_groups:
            pg["lr"] = lr_at(max(step / args.vae_steps, (time.time() - t_start) / args.vae_seconds), step,
                             args.vae_lr, 200)
        idx = torch.randint(0, n, (args.vae_batch,), device=dev, generator=g)
        x = images[idx].float() / 127.5 - 1.0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, device=dev, generator=g)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = l1 + l2 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            hist.append(dict(step=step, t=round(time.time() - t_start, 1), l1=l1.item(), l2=l2.item(), kl=kl.item()))
            log(f"vae step {step} l1 {l1.item():.4f} l2 {l2.item():.5f} kl/elt {kl.item():.3f}")
        step += 1
    logs["vae"] = dict(steps=step, seconds=round(time.time() - t_start, 1), batch=args.vae_batch, history=hist)
    return vae


@torch.no_grad()
def cycle_set(transformer, text, vae, toks, captions, args, dev, shift, scale):
    """Latents the model itself draws (the first --enc-cycle training captions, guidance 5, --enc-cycle-steps Euler
    steps, the model's shift) and their decodings: pairs (D(z), z) on the latent manifold the transformer was trained
    on, for the encoder's cycle term."""
    text.eval()
    transformer.eval()
    z = sample(transformer, text, vae, toks, captions[:args.enc_cycle], args, dev, 5.0, args.seed + 4, shift, scale,
               args.infer_shift, args.enc_cycle_steps, latents_only=True).to(dev)
    x = torch.cat([vae.decode(z[i:i + 256]).sample.clamp(-1, 1) for i in range(0, z.shape[0], 256)])
    return x, z


def train_vae_encoder(vae, images, shift, scale, args, dev, logs, cycle=None):
    """Fine-tune mode (--init-from-onnx): a new VAE encoder against the frozen decoder of the exported model (whose
    encoder was never shipped). Loss: L1 + L2 reconstruction through the frozen decoder (the decoder's latent space
    is fixed, so the encoder has to learn to produce it), a small KL term as in train_vae, and latent statistics:
    (mean z')^2 + (std z' - 1)^2 with z' = (posterior mean - shift_factor) * scaling_factor, the committed numbers, so
    that the latents the transformer is fine-tuned on have the scale it was trained in."""
    vae.decoder.requires_grad_(False)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.requires_grad_(False)
    # A freshly initialised encoder gives logvar ~ 0 (posterior std ~ 1): latents far noisier than the decoder and
    # the transformer were trained on (a CPU check: std 0.62 after 63 steps, the transformer's loss 4.5 against
    # run 11's 0.06). Its logvar channels start at -8 instead (std 0.018), and the statistics term uses the posterior
    # mean, so it cannot be met by noise.
    with torch.no_grad():
        conv = vae.encoder.conv_out
        c = conv.out_channels // 2
        conv.weight[c:].zero_()
        conv.bias[c:].fill_(args.enc_logvar_init)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.enc_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(args.seed + 3)
    n = images.shape[0]
    t_start = time.time()
    step = 0
    hist = []
    while (step < args.enc_steps and time.time() - t_start < args.enc_seconds
           and (args.stop_by is None or time.time() - T0 < args.stop_by)):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(max(step / args.enc_steps, (time.time() - t_start) / args.enc_seconds), step,
                             args.enc_lr, min(200, max(1, args.enc_steps // 10)))
        idx = torch.randint(0, n, (args.enc_batch,), device=dev, generator=g)
        x = images[idx].float() / 127.5 - 1.0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, device=dev, generator=g)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        zn = (post.mean.float() - shift) * scale
        stats = zn.mean() ** 2 + (zn.std() - 1.0) ** 2
        loss = l1 + l2 + args.vae_kl * kl + args.enc_stats * stats
        cyc = torch.zeros((), device=dev)
        if cycle is not None:  # E(D(z)) = z on the model's own latents (normalised units)
            j = torch.randint(0, cycle[0].shape[0], (args.enc_batch,), device=dev, generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                zc = vae.encode(cycle[0][j]).latent_dist.mean
            cyc = ((zc.float() - cycle[1][j]) * scale).pow(2).mean()
            loss = loss + args.enc_cycle_weight * cyc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.enc_log_every == 0:
            hist.append(dict(step=step, t=round(time.time() - t_start, 1), l1=l1.item(), l2=l2.item(), kl=kl.item(),
                             latent_mean=zn.mean().item(), latent_std=zn.std().item(),
                             posterior_std=post.std.float().mean().item(), cycle=cyc.item()))
            log(f"vae encoder step {step} l1 {l1.item():.4f} l2 {l2.item():.5f} kl/elt {kl.item():.3f} "
                f"normalised latent means: mean {zn.mean().item():.3f} std {zn.std().item():.3f}; "
                f"posterior std {post.std.float().mean().item():.4f}; cycle {cyc.item():.4f}")
        step += 1
    vae.requires_grad_(True)
    logs["vae_encoder"] = dict(steps=step, seconds=round(time.time() - t_start, 1), batch=args.enc_batch,
                               history=hist)
    return vae


def load_from_onnx(src: Path, logs):
    """The modules of an exported nano model: rebuilt from its ONNX graphs (a model folder with
    transformer/model.onnx; needs onnx and onnxruntime, and the export tool's torch: from_onnx.py) or from a folder
    that `from_onnx.py --out` wrote (what device_train.sh carries: the device's torch need not reproduce the
    committed graphs). Returns the modules and the CLIP / T5 token ids the export had kept."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if (src / "transformer" / "model.onnx").is_file():
        import from_onnx

        mods, reps = from_onnx.rebuild_all(src)
        logs["from_onnx"] = reps
        kept = {c: from_onnx.kept_ids(src, c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3")}
        te1, te2, te3 = mods["text_encoder"], mods["text_encoder_2"], mods["text_encoder_3"]
        transformer, vae = mods["transformer"], mods["vae_decoder"]
    else:
        te1 = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder")
        te2 = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2")
        te3 = T5EncoderModel.from_pretrained(src / "text_encoder_3")
        transformer = SD3Transformer2DModel.from_pretrained(src / "transformer")
        vae = AutoencoderKL.from_pretrained(src / "vae")
        kept = json.loads((src / "onnx_kept_token_ids.json").read_text())
    for m in (te1, te2, te3, transformer, vae):
        m.float()
    return te1, te2, te3, transformer, vae, kept


@torch.no_grad()
def encode_latents(vae, images, dev, bs=512):
    means, stds = [], []
    for i in range(0, images.shape[0], bs):
        x = images[i:i + bs].float() / 127.5 - 1.0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def ema_update(ema, model, decay):
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def compile_models(transformer, text, dev, ids, latents):
    """torch.compile of the transformer and the text encoders, compiled now: one forward and backward at the
    training batch size (`ids`: the three token-id batches, `latents`: a latent batch; only their shapes and dtypes
    matter, so nothing recompiles later). Changes no parameter (the gradients are dropped) and draws from no random
    stream. Returns (transformer, text) as the training calls them: the eager modules if compiling failed."""
    fwd_t, fwd_x = torch.compile(transformer), torch.compile(text)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ctx, pooled = fwd_x(*ids)
            v = fwd_t(hidden_states=latents, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=torch.full((latents.shape[0],), 500.0, device=dev), return_dict=False)[0]
        v.float().square().mean().backward()
        for p in list(transformer.parameters()) + list(text.parameters()):
            p.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        log("compiled")
        return fwd_t, fwd_x
    except Exception as e:  # noqa: BLE001
        for p in list(transformer.parameters()) + list(text.parameters()):
            p.grad = None
        log(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly")
        return transformer, text


def train_dit(transformer, text, lat_mean, lat_std, ids, empty_ids, shift, scale, args, dev, logs, compiled=None):
    """`compiled`: (transformer, text) from `compile_models` when main compiled them already (beside the data)."""
    params = [
        {"params": [p for n_, p in text.named_parameters() if "embed" in n_ or "shared" in n_], "weight_decay": 0.0},
        {"params": [p for n_, p in text.named_parameters() if not ("embed" in n_ or "shared" in n_)]},
        {"params": list(transformer.parameters())},
    ]
    opt = torch.optim.AdamW(params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=args.weight_decay,
                            fused=dev.type == "cuda")
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_x = copy.deepcopy(text).eval().requires_grad_(False)
    fwd_t, fwd_x = transformer, text
    if compiled is not None:
        fwd_t, fwd_x = compiled
    elif args.compile:
        b = args.dit_batch
        fwd_t, fwd_x = compile_models(transformer, text, dev, (ids[0][:b], ids[1][:b], ids[2][:b]),
                                      lat_mean[:b].contiguous())
    g = torch.Generator(device=dev).manual_seed(args.seed + 2)
    n = lat_mean.shape[0]
    ids_l, ids_g, ids_t = ids
    e_l, e_g, e_t = empty_ids
    # data parallel (class Dist): every process draws the global batch from the same generator and computes its
    # slice; one process: the global batch is --dit-batch and the slice all of it
    world, rank = DIST.world, DIST.rank
    gb = args.dit_batch * world
    mine = slice(rank * args.dit_batch, (rank + 1) * args.dit_batch)
    t_start = time.time()
    hist = []
    step = 0
    run_loss = None
    all_params = [p for g_ in params for p in g_["params"]]
    while True:
        # rank 0's clock and stop file decide for every process: asked every step with one process, every 10th
        # with several (reading the broadcast waits for the GPU: the learning rate then moves in steps of 10)
        if world == 1 or step % 10 == 0:
            seconds, stop = DIST.control(dev, time.time() - t_start, float(
                (args.stop_by is not None and time.time() - T0 >= args.stop_by)
                or (args.stop_file is not None and step % 50 == 0 and args.stop_file.exists())))
        if step >= args.dit_steps or seconds >= args.dit_seconds or stop:
            break
        # the cosine spans --schedule-seconds of training over all calls (--seconds-before of them done earlier)
        lr = lr_at(max(step / args.dit_steps, (args.seconds_before + seconds) / args.schedule_seconds),
                   step, args.dit_lr, args.warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, n, (gb,), device=dev, generator=g)
        drop = torch.rand(gb, device=dev, generator=g) < args.caption_dropout
        noise = torch.randn((gb,) + tuple(lat_mean.shape[1:]), device=dev, generator=g)[mine]
        eps = torch.randn((gb,) + tuple(lat_mean.shape[1:]), device=dev, generator=g)[mine]
        t = torch.sigmoid(torch.randn(gb, device=dev, generator=g) * args.logit_std + args.logit_mean)[mine]
        idx, drop = idx[mine], drop[mine]
        bl = torch.where(drop[:, None], e_l, ids_l[idx])
        bg = torch.where(drop[:, None], e_g, ids_g[idx])
        bt = torch.where(drop[:, None], e_t, ids_t[idx])
        z = lat_mean[idx] + lat_std[idx] * noise
        x0 = (z - shift) * scale
        if args.train_shift != 1.0:
            t = args.train_shift * t / (1 + (args.train_shift - 1) * t)
        tb = t[:, None, None, None]
        # contiguous, as the latents the compile saw (VAE outputs can come in another memory layout: a stride
        # guard then recompiles the transformer at the first step, 87 s on this project's CPU)
        xt = ((1 - tb) * x0 + tb * eps).contiguous()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ctx, pooled = fwd_x(bl, bg, bt)
            v = fwd_t(hidden_states=xt, encoder_hidden_states=ctx, pooled_projections=pooled,
                            timestep=t * 1000, return_dict=False)[0]
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = DIST.mean_grads(all_params, loss)  # the global batch's mean loss
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_t, transformer, decay)
        ema_update(ema_x, text, decay)
        loss = loss.item()
        run_loss = loss if run_loss is None else 0.98 * run_loss + 0.02 * loss
        if step % 250 == 0:
            hist.append(dict(step=step, t=round(time.time() - t_start, 1), loss=loss, smoothed=run_loss, lr=lr))
            log(f"dit step {step} loss {loss:.4f} smoothed {run_loss:.4f} lr {lr:.2e}")
        step += 1
    logs["dit"] = dict(steps=step, seconds=round(time.time() - t_start, 1), batch=gb, processes=world,
                       batch_per_process=args.dit_batch, final_smoothed_loss=run_loss, history=hist)
    return ema_t, ema_x


@torch.no_grad()
def sample(transformer, text, vae, toks, prompts, args, dev, guidance, seed, shift, scale, infer_shift, steps,
           latents_only=False):
    """Plain flow-matching Euler with CFG, as StableDiffusion3Pipeline (sigmas = linspace(1, 1/N, N), shifted).
    uint8 images [N, H, W, 3]; with latents_only the final latents in the VAE's space (x / scale + shift)."""
    out = []
    ids = tokenize(toks, list(prompts), args.t5_len)
    neg = tokenize(toks, [""] * len(prompts), args.t5_len)
    g = torch.Generator(device="cpu").manual_seed(seed)
    side = args.image_size // 8
    for i in range(0, len(prompts), 64):
        sl = slice(i, i + 64)
        b = len(prompts[sl])
        ctx, pooled = text(*(x[sl].to(dev) for x in ids))
        nctx, npooled = text(*(x[sl].to(dev) for x in neg))
        x = torch.randn((b, 16, side, side), generator=g).to(dev)
        s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        s = infer_shift * s / (1 + (infer_shift - 1) * s)
        sig = torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()
        for k in range(steps):
            tt = torch.full((b,), float(sig[k] * 1000), device=dev)
            if guidance > 1.0:
                v = transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([nctx, ctx]),
                                pooled_projections=torch.cat([npooled, pooled]), timestep=torch.cat([tt, tt]),
                                return_dict=False)[0]
                vu, vc = v.chunk(2)
                v = vu + guidance * (vc - vu)
            else:
                v = transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=tt,
                                return_dict=False)[0]
            x = x + (sig[k + 1] - sig[k]) * v
        if latents_only:
            out.append((x / scale + shift).cpu())
            continue
        img = vae.decode(x / scale + shift).sample
        out.append(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return torch.cat(out) if latents_only else np.concatenate(out)


def train_pair_prompts(n, seed):
    """n pair scenes of the train4 distribution (no held-out combination) with their captions, in the eval files'
    form; category by what the caption states: a relation -> position, both colours -> color_attr, else
    two_objects."""
    rng = np.random.default_rng([int(seed), 22, 7])
    out = []
    while len(out) < n:
        sc = scenes.sample_scene(rng, "train4")
        if sc.kind != "pair":
            continue
        sc.stated = scenes._stated_for(sc, rng)
        cat = ("position" if "relation" in sc.stated else
               "color_attr" if "color" in sc.stated and "color2" in sc.stated else "two_objects")
        out.append({"prompt": scenes.caption(sc, rng), "category": cat, "scene": sc.to_dict()})
    return out


def evaluate(transformer, text, vae, toks, args, dev, shift, scale, out_dir: Path, logs):
    """The held-out prompts of eval_prompts.json (and, with --split train4, eval_prompts_v2.json: "v2_" files and
    log keys) drawn by the PyTorch model and scored by checker.py. --eval-n limits the prompts per file."""
    import checker
    from PIL import Image

    files = [("", "eval_prompts.json")] + ([("v2_", "eval_prompts_v2.json")] if args.split in ("train4", "train5")
                                            else [])
    if args.eval_train_pairs > 0:
        files.append(("trainpairs_", None))
    for tag, fname in files:
        prompts = (json.loads((HERE / fname).read_text())[:args.eval_n] if fname is not None
                   else train_pair_prompts(args.eval_train_pairs, args.eval_train_pairs_seed))
        res = {}
        for name, guidance in (("cfg", args.eval_guidance), ("nocfg", 1.0)):
            imgs = sample(transformer, text, vae, toks, [p["prompt"] for p in prompts], args, dev, guidance, 0,
                          shift, scale, args.infer_shift, args.eval_steps)
            a = checker.adherence(list(imgs), prompts)
            res[name] = {c: round(100.0 * k / n_, 1) for c, (k, n_) in a["per_category"].items()}
            res[name]["overall"] = round(100.0 * a["overall"][0] / a["overall"][1], 1)
            # which checks the failing images fail (an image fails its category when any stated check fails):
            # swapped colours show as color and color2 together, a reversed relation as relation
            failed = {}
            for p_, r_ in zip(prompts, a["results"]):
                if not checker.category_pass(r_, p_["category"]):
                    for k_, v_ in r_.items():
                        if v_ is False:
                            failed[k_] = failed.get(k_, 0) + 1
                    if r_.get("color") is False and r_.get("color2") is False:
                        failed["color+color2"] = failed.get("color+color2", 0) + 1
            res[name]["failed_checks"] = dict(sorted(failed.items()))
            log(f"eval {tag}{name} (guidance {guidance}):", res[name])
            rows = [imgs[r * 16:(r + 1) * 16] for r in range(min(4, len(imgs) // 16))] or [imgs]
            grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
            Image.fromarray(grid).save(out_dir / f"eval_{tag}{name}.png")
        logs[f"eval_torch{('_' + tag.rstrip('_')) if tag else ''}"] = res


def save_pipeline(out: Path, tok_dir: Path, transformer, text, vae, args, shift, scale, used_ids):
    """Saves the weights as float16 (what the export stores; the export tool and --resume load them as float32),
    with the CLIP token-embedding rows of ids no caption uses set to zero (they never change from their random
    initialisation, and zeros compress: the folder travels between device calls). With --init-from-onnx or
    --resume the VAE is saved as float32: its decoder holds the committed graph's int8 x scale values, which the
    export's int8 quantization gives back exactly from float32 (not from their float16 roundings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for te in (text.te1, text.te2):
            table = te.text_model.embeddings.token_embedding.weight
            unused = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
            unused[torch.tensor(used_ids, device=table.device)] = False
            table[unused] = 0.0
    half = lambda m: copy.deepcopy(m).to(torch.float16)  # noqa: E731  (the models stay float32 for --eval)
    half(transformer).save_pretrained(out / "transformer")
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))
    exact = args.init_from_onnx is not None or args.resume is not None or args.vae_from is not None  # as loaded
    (copy.deepcopy(vae).float() if exact else half(vae)).save_pretrained(out / "vae")
    half(text.te1).save_pretrained(out / "text_encoder")
    half(text.te2).save_pretrained(out / "text_encoder_2")
    half(text.te3).save_pretrained(out / "text_encoder_3")
    for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if (out / t).exists():
            shutil.rmtree(out / t)
        shutil.copytree(tok_dir / t, out / t, symlinks=False)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.infer_shift).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.35.2", "_name_or_path": "sd3-nano",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizers-from", type=Path, default=HERE.parent / "fixtures" / "tiny-sd35")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=scenes.TRAIN_SPLITS, default="train",
                    help="training data: scenes.py split (train3: three object sizes, small / medium / large; "
                         "train3c: train3 with about 45%% count scenes instead of 29%%; train4: train3's kinds "
                         "plus about 40%% pair scenes, issue 22; train5: train4 with some same-shape relation "
                         "pairs, scenes.SAME_SHAPE_SHARE_TRAIN5)")
    ap.add_argument("--n-train", type=int, default=120_000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--t5-len", type=int, default=256, help="T5 tokens, the pipeline's default max_sequence_length")
    # widths
    ap.add_argument("--clip-width", type=int, default=32)
    ap.add_argument("--clip-layers", type=int, default=2)
    ap.add_argument("--t5-width", type=int, default=64)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--dit-layers", type=int, default=5)
    ap.add_argument("--dit-heads", type=int, default=3)
    ap.add_argument("--dit-head-dim", type=int, default=32)
    ap.add_argument("--vae-channels", default="16,32,64,64")
    # VAE
    ap.add_argument("--vae-steps", type=int, default=6000)
    ap.add_argument("--vae-seconds", type=float, default=150)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    # transformer + text encoders
    ap.add_argument("--dit-steps", type=int, default=20000)
    ap.add_argument("--dit-seconds", type=float, default=300)
    ap.add_argument("--dit-batch", type=int, default=256)
    ap.add_argument("--dit-lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--logit-mean", type=float, default=0.0)
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--train-shift", type=float, default=1.0)
    ap.add_argument("--infer-shift", type=float, default=1.0, help="written to scheduler_config.json")
    # evaluation with the PyTorch model
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--eval-guidance", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--schedule-seconds", type=float, default=None,
                    help="training seconds the learning-rate cosine spans over all calls (default --dit-seconds)")
    ap.add_argument("--seconds-before", type=float, default=0.0,
                    help="training seconds done by earlier calls (with --resume)")
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--stop-by", type=float, default=None,
                    help="end the transformer training this many seconds after the start of the script whatever "
                         "--dit-seconds says (so a device call's time limit leaves time to save; device_train.sh "
                         "sets it to TRAIN_LIMIT - 30)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="a pipeline folder whose VAE (and latent scale) and text encoders start this run; the "
                         "transformer starts from random weights")
    ap.add_argument("--overlap-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="with --compile: compile the transformer and text encoders while a second thread renders "
                         "and tokenizes the data (on the GPU machine those were 123 s and torch.compile 110 s of "
                         "run 16's start); the same weights either way (--no-overlap-compile: one after the other)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the transformer and text encoders (--no-compile undoes a preset's --compile)")
    ap.add_argument("--init-from-onnx", type=Path, default=None,
                    help="fine-tune an exported model (issue 22): a model folder (ONNX graphs, e.g. models/sd3-nano; "
                         "rebuilt by from_onnx.py) or a folder from_onnx.py --out wrote. Its decoder (frozen), latent "
                         "shift/scale, text encoders and transformer start this run; a VAE encoder is trained "
                         "against the decoder first (--enc-*), then the transformer and text encoders are trained "
                         "further on --split (new token rows start as the export's shared row)")
    ap.add_argument("--enc-steps", type=int, default=20000)
    ap.add_argument("--enc-seconds", type=float, default=90)
    ap.add_argument("--enc-batch", type=int, default=128)
    ap.add_argument("--enc-lr", type=float, default=1e-3)
    ap.add_argument("--enc-stats", type=float, default=1.0, help="weight of the latent-statistics term")
    ap.add_argument("--enc-log-every", type=int, default=100)
    ap.add_argument("--enc-cycle", type=int, default=0,
                    help="latents the model draws for the encoder's cycle term E(D(z)) = z (0: none); the decoder "
                         "alone does not pin the latent directions it ignores, the transformer's own samples do")
    ap.add_argument("--enc-cycle-steps", type=int, default=28)
    ap.add_argument("--enc-cycle-weight", type=float, default=1.0)
    ap.add_argument("--enc-logvar-init", type=float, default=-8.0,
                    help="the new encoder's logvar channels start at this value (weights zero)")
    ap.add_argument("--eval-n", type=int, default=None, help="only the first N prompts of each eval file")
    ap.add_argument("--eval-train-pairs", type=int, default=0,
                    help="also draw N pair scenes of the training distribution (split train4, new seed) and score "
                         "them: tells pairs not learnt from pairs learnt but not generalised (log key "
                         "eval_torch_trainpairs)")
    ap.add_argument("--eval-train-pairs-seed", type=int, default=None,
                    help="seed of --eval-train-pairs' scenes (default: --seed + 777; a --resume run passes its "
                         "parent's to score the same prompts)")
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="a pipeline folder whose VAE (encoder and decoder, shift and scale) is kept as it is; text "
                         "encoders and transformer start new, of this run's sizes (a retrain on a shipped VAE)")
    ap.add_argument("--stop-file", type=Path, default=None,
                    help="end the transformer's training early when this file exists (checked every 50 steps), "
                         "then save and evaluate as usual: a background run on the GPU machine can be ended to fit "
                         "the session's device time")
    ap.add_argument("--resume", type=Path, default=None,
                    help="a pipeline folder saved by an earlier run: its VAE is kept (no VAE training), its "
                         "transformer and text encoders are trained further")
    args = ap.parse_args()
    if args.schedule_seconds is None:
        args.schedule_seconds = args.dit_seconds
    if args.eval_train_pairs_seed is None:
        args.eval_train_pairs_seed = args.seed + 777

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    global DIST
    DIST = Dist()
    if DIST.world > 1 and (args.init_from_onnx is not None or not (args.resume or args.vae_from or args.init_from)):
        raise SystemExit("several processes (torchrun) train the transformer and text encoders only: give the VAE "
                         "with --vae-from, --resume or --init-from (a new VAE, and --init-from-onnx's VAE encoder, "
                         "are trained by one process)")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = DIST.device()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logs = dict(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                processes=DIST.world, torch=torch.__version__)
    args.out.mkdir(parents=True, exist_ok=True)

    clip_l, clip_g, t5c, ditc, vaec = configs(args)
    onnx_kept = None
    if sum(x is not None for x in (args.init_from, args.init_from_onnx, args.resume, args.vae_from)) > 1:
        raise SystemExit("--init-from, --init-from-onnx, --resume and --vae-from exclude each other")
    if args.init_from_onnx is not None:
        te1, te2, te3, transformer, vae, onnx_kept = load_from_onnx(args.init_from_onnx, logs)
    elif args.init_from is not None:
        te1 = CLIPTextModelWithProjection.from_pretrained(args.init_from / "text_encoder")
        te2 = CLIPTextModelWithProjection.from_pretrained(args.init_from / "text_encoder_2")
        te3 = T5EncoderModel.from_pretrained(args.init_from / "text_encoder_3")
        vae = AutoencoderKL.from_pretrained(args.init_from / "vae")
        torch.manual_seed(args.seed + 13)
        transformer = SD3Transformer2DModel(**ditc)
        for m in (te1, te2, te3, transformer, vae):
            m.float()
    elif args.resume is None:
        vae_from = None
        if args.vae_from is not None:  # the VAE (encoder and decoder) as it is; everything else new, of configs()
            vae_from = AutoencoderKL.from_pretrained(args.vae_from / "vae").float()
        torch.manual_seed(args.seed + 10)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_l))
        torch.manual_seed(args.seed + 11)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))
        torch.manual_seed(args.seed + 12)
        te3 = T5EncoderModel(T5Config(**t5c))
        torch.manual_seed(args.seed + 13)
        transformer = SD3Transformer2DModel(**ditc)
        torch.manual_seed(args.seed + 14)
        vae = AutoencoderKL(**vaec) if vae_from is None else vae_from
    else:
        te1 = CLIPTextModelWithProjection.from_pretrained(args.resume / "text_encoder")
        te2 = CLIPTextModelWithProjection.from_pretrained(args.resume / "text_encoder_2")
        te3 = T5EncoderModel.from_pretrained(args.resume / "text_encoder_3")
        transformer = SD3Transformer2DModel.from_pretrained(args.resume / "transformer")
        vae = AutoencoderKL.from_pretrained(args.resume / "vae")
        for m in (te1, te2, te3, transformer, vae):
            m.float()
    text = TextStack(te1, te2, te3).to(dev)
    transformer.to(dev)
    vae.to(dev)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    logs["parameters"] = dict(transformer=count(transformer), vae_decoder=count(vae.decoder),
                              vae_encoder=count(vae.encoder), clip_l=count(te1), clip_g=count(te2), t5=count(te3))
    log("parameters", logs["parameters"])

    def prepare_data():
        """The training images, captions and token ids, on the host (a second thread runs this while main compiles)."""
        log("rendering", args.n_train, "training images")
        images, captions, _ = scenes.make_dataset(args.n_train, seed=args.seed, split=args.split,
                                                  workers=args.workers)
        log("images", images.shape, "distinct captions", len(set(captions)))
        seconds = round(time.time() - T0, 1)
        toks = load_tokenizers(args.tokenizers_from)
        distinct = sorted(set(captions))
        where = {c: i for i, c in enumerate(distinct)}
        rows = torch.tensor([where[c] for c in captions])
        ids = tuple(x[rows] for x in tokenize(toks, distinct, args.t5_len))
        log("tokenized")
        return dict(images=images, captions=captions, seconds=seconds, toks=toks, ids=ids,
                    empty=tokenize(toks, [""], args.t5_len))

    compiled = None
    if args.compile and args.overlap_compile:
        import threading
        data, failed = {}, []

        def run():
            try:
                data.update(prepare_data())
            except BaseException as e:  # noqa: BLE001  (raised again in main below)
                failed.append(e)

        worker = threading.Thread(target=run, name="data")
        worker.start()
        # compiled in training mode (T5's dropout), at the training batch's shapes: token ids (any valid id) and
        # latents of the VAE's channels and factor
        transformer.train()
        text.train()
        b = args.dit_batch
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = args.image_size // factor
        zeros = lambda n: torch.zeros((b, n), dtype=torch.long, device=dev)  # noqa: E731
        lat = torch.zeros((b, transformer.config.in_channels, side, side), device=dev)
        compiled = compile_models(transformer, text, dev, (zeros(77), zeros(77), zeros(args.t5_len)), lat)
        worker.join()
        if failed:
            raise failed[0]
    else:
        data = prepare_data()
    captions, toks = data["captions"], data["toks"]
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous().to(dev)
    logs["data"] = dict(n=args.n_train, distinct_captions=len(set(captions)), seconds=data["seconds"])
    ids = tuple(x.to(dev) for x in data["ids"])
    empty = tuple(x.to(dev) for x in data["empty"])
    del data
    used = sorted(set(ids[0].unique().tolist()) | set(ids[1].unique().tolist()) | set(empty[0].unique().tolist())
                  | set(empty[1].unique().tolist()))
    if DIST.main:
        (args.out / "clip_token_ids.json").write_text(json.dumps(used) + "\n")
    log("CLIP token ids used by the captions:", len(used))

    if onnx_kept is not None:  # rows the export kept stay as they are in the saved tables (save_pipeline)
        used = sorted(set(used) | set(onnx_kept["text_encoder"]) | set(onnx_kept["text_encoder_2"]))
    fresh_vae = args.resume is None and args.init_from is None and args.init_from_onnx is None and args.vae_from is None
    if fresh_vae:
        vae.train()
        train_vae(vae, images, args, dev, logs)
    if args.init_from_onnx is not None:
        sh, sc = float(vae.config.shift_factor), float(vae.config.scaling_factor)
        cycle = None
        if args.enc_cycle > 0:
            t = time.time()
            cycle = cycle_set(transformer, text, vae, toks, captions, args, dev, sh, sc)
            log(f"cycle set: {cycle[1].shape[0]} latents drawn by the model in {time.time() - t:.1f} s")
        vae.train()
        train_vae_encoder(vae, images, sh, sc, args, dev, logs, cycle)
        del cycle
    vae.eval()
    lat_mean, lat_std = encode_latents(vae, images, dev)
    if fresh_vae:
        shift = lat_mean.mean().item()
        scale = 1.0 / lat_mean.sub(shift).pow(2).mean().add(lat_std.pow(2).mean()).sqrt().item()
    else:  # the transformer was trained in this latent scale: keep it
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    logs["latents"] = dict(shift_factor=shift, scaling_factor=scale,
                           normalised_mean=lat_mean.sub(shift).mul(scale).mean().item(),  # the rms: E[z'^2]^0.5
                           normalised_rms=math.sqrt(lat_mean.sub(shift).mul(scale).pow(2).mean().item()
                                                    + lat_std.mul(scale).pow(2).mean().item()))
    log(f"latents shift_factor {shift:.4f} scaling_factor {scale:.4f}")
    if DIST.main:  # reconstruction quality on held-out scenes (rank 0 alone: only it writes the log)
        with torch.no_grad():
            him, _, _ = scenes.make_dataset(256, seed=args.seed + 999, split="heldout", workers=args.workers)
            x = torch.from_numpy(him).permute(0, 3, 1, 2).to(dev).float() / 127.5 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            logs["vae_heldout_psnr"] = (10 * torch.log10(4.0 / ((rec - x) ** 2).mean())).item()
            log("VAE held-out PSNR", logs["vae_heldout_psnr"])
    del images

    transformer.train()
    text.train()
    ema_t, ema_x = train_dit(transformer, text, lat_mean, lat_std, ids, empty, shift, scale, args, dev, logs,
                             compiled)
    DIST.finish()
    if not DIST.main:  # rank 0 saves and evaluates (its weights are every process's)
        return

    # saved before the evaluation, so that a call cut short by its time limit still brings the weights back
    save_pipeline(args.out / "pipeline", args.tokenizers_from, ema_t, ema_x, vae, args, shift, scale, used)
    logs["total_seconds"] = round(time.time() - T0, 1)
    (args.out / "train_log.json").write_text(json.dumps(logs, indent=1) + "\n")
    log("saved", args.out / "pipeline")
    if args.eval:
        evaluate(ema_t, ema_x, vae, toks, args, dev, shift, scale, args.out, logs)
        logs["total_seconds"] = round(time.time() - T0, 1)
        (args.out / "train_log.json").write_text(json.dumps(logs, indent=1) + "\n")
    log("done", args.out)


if __name__ == "__main__":
    main()
