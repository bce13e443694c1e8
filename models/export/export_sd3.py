#!/usr/bin/env python3
"""Exports a Stable Diffusion 3 / 3.5 pipeline to the ONNX model folder that the `sd3-onnx` crate loads.

The output has optimum's layout and graph names (what `optimum-cli export onnx --task text-to-image` writes):

    model_index.json  manifest.json  scheduler/scheduler_config.json  tokenizer{,_2,_3}/
    text_encoder/model.onnx     input_ids i64 [B,S] -> text_embeds [B,P], last_hidden_state, hidden_states.0 .. .L
    text_encoder_2/model.onnx   same (CLIP-G)
    text_encoder_3/model.onnx   input_ids i64 [B,S] -> last_hidden_state [B,S,D]                       (T5)
    transformer/model.onnx      hidden_states [B,C,h,w], encoder_hidden_states [B,S,D], pooled_projections [B,P],
                                timestep [B] (float32) -> out_hidden_states [B,C,h,w]
    transformer/model_skip_layers.onnx   with --skip-layers I,J,..: the same graph with those MMDiT blocks skipped
                                (skip-layer guidance), same inputs/outputs; ONNX metadata "skip_layers": "[I, J]"
    vae_decoder/model.onnx      latent_sample -> sample
    vae_encoder/model.onnx      sample -> latent_parameters (mean ++ logvar)
    */config.json               each component's diffusers/transformers config
    *.onnx.data                 external weights, for graphs over 2 GB (one file per graph)

Unlike optimum's export, the graphs are prepared for ONNX Runtime's CUDA provider (see README.md next to this file):

  --attention fused --exporter torchscript  (default)
      TorchScript exporter at opset 16, then ONNX Runtime's transformer optimizer (onnxruntime.transformers,
      model_type "mmdit"/"clip"/"vae", T5 fusions by hand): MMDiT attention -> com.microsoft MultiHeadAttention,
      LayerNorm (the adaLN modulation `LN(x) * (1 + scale) + shift` is folded into LayerNormalization with broadcast scale and
      bias, which is why the opset stays below 17: at 17 the exporter emits LayerNormalization itself and the
      modulation cannot be folded; the result declares opset 17), tanh-GELU + bias -> FastGelu, T5 RMSNorm +
      residual -> SkipSimplifiedLayerNorm, CLIP residual + LayerNorm -> SkipLayerNorm.
  --attention fused --exporter dynamo
      torch.export-based exporter at opset 23: attention -> ONNX `Attention`, LayerNormalization, Gelu; then the
      same adaLN folding (our own pass) and Gelu + bias -> BiasGelu.
  --attention plain
      opset 17 (TorchScript) or 18 (dynamo), no rewrites: attention as MatMul/Softmax, like optimum.

Precision: the graphs are exported in float32 and converted afterwards (onnxruntime.transformers.float16), keeping
the timestep input and the sinusoidal timestep projection in float32 (diffusers computes it in float32 too). T5 in
fp16 keeps the overflow-prone parts in float32 (`--t5-precision mixed`, see README.md). bf16 is the fp16
conversion retyped to bfloat16 (initializers re-rounded from float32).

Examples:
    python models/export/export_sd3.py --model /path/to/stable-diffusion-3-medium-diffusers --dtype fp16 --out sd3m-onnx
    python models/export/export_sd3.py --random sd3-medium --tokenizers-from models/fixtures/tiny-sd3 \\
        --components transformer --dtype fp16 --out /tmp/sd3m-random
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ALL_COMPONENTS = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder"]
# Graphs whose weights exceed this are saved as model.onnx + model.onnx.data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Configs of the real models (for --random). Values copied from the Hugging Face repos' config files:
#   stabilityai/stable-diffusion-3-medium-diffusers   transformer/config.json, vae/config.json,
#       text_encoder/config.json (CLIP-L), text_encoder_2/config.json (OpenCLIP bigG), text_encoder_3/config.json
#       (google/t5-v1_1-xxl encoder), scheduler/scheduler_config.json
#   stabilityai/stable-diffusion-3.5-medium           transformer/config.json (MMDiT-X: dual attention in blocks
#       0..12, qk RMS-norm, pos_embed_max_size 384); encoders, VAE and scheduler as SD3-medium
#   stabilityai/stable-diffusion-3.5-large            transformer/config.json (38 blocks of 38 heads, qk RMS-norm)
# ----------------------------------------------------------------------------------------------------------------

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, layer_norm_eps=1e-5)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu", max_position_embeddings=77, layer_norm_eps=1e-5)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              dropout_rate=0.1, tie_word_embeddings=False)
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
SD3_MEDIUM_MMDIT = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_MEDIUM_MMDIT = dict(SD3_MEDIUM_MMDIT, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=list(range(13)))
SD35_LARGE_MMDIT = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# The tiny fixture shape (models/make_fixtures.py, spec "tiny-sd3"): like SD3-medium, every width shrunk.
TINY = dict(
    clip_l=dict(hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=8,
                hidden_act="quick_gelu", max_position_embeddings=77, layer_norm_eps=1e-5),
    clip_g=dict(hidden_size=12, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, projection_dim=12,
                hidden_act="gelu", max_position_embeddings=77, layer_norm_eps=1e-5),
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
            dropout_rate=0.0),
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                     pooled_projection_dim=20, out_channels=16, pos_embed_max_size=16),
    vae=dict(SD3_VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64),
)
RANDOM_VARIANTS = {
    "sd3-medium": dict(clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, transformer=SD3_MEDIUM_MMDIT, vae=SD3_VAE, shift=3.0),
    "sd3.5-medium": dict(clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, transformer=SD35_MEDIUM_MMDIT, vae=SD3_VAE,
                         shift=3.0),
    "sd3.5-large": dict(clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, transformer=SD35_LARGE_MMDIT, vae=SD3_VAE, shift=3.0),
    "tiny": dict(TINY, shift=3.0),
    # The tiny shapes with SD3.5's q/k RMS-norm (norm weights drawn in 0.5..1.5 so that image and context norms
    # differ): for the --fused-kernels HeadRmsNorm fixture (make_export_fixtures.py).
    "tiny-qk": dict(TINY, transformer=dict(TINY["transformer"], qk_norm="rms_norm"), shift=3.0),
    # The tiny shapes as SD3.5-medium's MMDiT-X: q/k RMS-norm and dual attention (attn2) in blocks 0 and 1 of 4
    # (dual -> dual -> plain -> last, as SD3.5-medium's blocks 12 -> 13 -> ... -> 23), norm weights drawn like
    # tiny-qk: for the --fused-kernels dual-attention fixture (make_export_fixtures.py).
    "tiny-dual": dict(TINY, transformer=dict(TINY["transformer"], qk_norm="rms_norm", num_layers=4,
                                             dual_attention_layers=[0, 1]), shift=3.0),
}


# ----------------------------------------------------------------------------------------------------------------
# Loading the PyTorch components
# ----------------------------------------------------------------------------------------------------------------


def tokenizer_vocab_size(tok_dir: Path) -> int:
    """len(tokenizer) of the tokenizer folder (every id it can emit)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tok_dir)))


def _from_pretrained(cls, path: Path):
    """transformers >= 4.56 calls the argument `dtype` (5.x dropped `torch_dtype`)."""
    try:
        return cls.from_pretrained(path, dtype=torch.float32).eval()
    except TypeError:
        return cls.from_pretrained(path, torch_dtype=torch.float32).eval()


class Source:
    """Where the PyTorch modules, configs and tokenizers come from: a diffusers folder or random weights."""

    def __init__(self, model: Path | None, random_variant: str | None, tokenizers_from: Path | None, seed: int,
                 layers: int | None = None, text_layers: int | None = None):
        self.layers = layers
        self.text_layers = text_layers
        self.model = model
        self.variant = random_variant
        self.tokenizers_from = tokenizers_from if tokenizers_from else model
        self.seed = seed
        if self.tokenizers_from is None:
            raise SystemExit("--random needs --tokenizers-from DIR (a folder with tokenizer/, tokenizer_2/, tokenizer_3/)")
        for sub in ("tokenizer", "tokenizer_2"):
            if not (self.tokenizers_from / sub).is_dir():
                raise SystemExit(f"{self.tokenizers_from / sub} does not exist")

    def _seeded(self, k: int):
        torch.manual_seed(self.seed * 100 + k)

    def load(self, component: str) -> torch.nn.Module:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        if self.model is not None:
            sub = {"vae_decoder": "vae", "vae_encoder": "vae"}.get(component, component)
            path = self.model / sub
            if component in ("text_encoder", "text_encoder_2"):
                return _from_pretrained(CLIPTextModelWithProjection, path)
            if component == "text_encoder_3":
                return _from_pretrained(T5EncoderModel, path)
            if component == "transformer":
                return SD3Transformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()
            return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()

        spec = RANDOM_VARIANTS[self.variant]
        if component in ("text_encoder", "text_encoder_2"):
            tok = "tokenizer" if component == "text_encoder" else "tokenizer_2"
            c = dict(spec["clip_l" if component == "text_encoder" else "clip_g"])
            if self.text_layers:
                c["num_hidden_layers"] = self.text_layers
            self._seeded(1 if component == "text_encoder" else 2)
            # eos_token_id 49407: pool at the first <|endoftext|> (CLIP's vocabulary, as the tokenizers here).
            cfg = CLIPTextConfig(vocab_size=tokenizer_vocab_size(self.tokenizers_from / tok), bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=1, **c)
            return CLIPTextModelWithProjection(cfg).eval()
        if component == "text_encoder_3":
            self._seeded(3)
            vocab = tokenizer_vocab_size(self.tokenizers_from / "tokenizer_3")
            vocab = (vocab + 127) // 128 * 128  # padded like T5's 32128 >= 32100 ids
            t5 = dict(spec["t5"])
            if self.text_layers:
                t5["num_layers"] = self.text_layers
            return T5EncoderModel(T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=1, **t5)).eval()
        if component == "transformer":
            self._seeded(4)
            cfg = dict(spec["transformer"])
            if self.layers:
                cfg["num_layers"] = self.layers
                if "dual_attention_layers" in cfg:
                    cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < self.layers - 1]
            m = SD3Transformer2DModel(**cfg).eval()
            if self.variant in ("tiny-qk", "tiny-dual"):
                with torch.no_grad():
                    for name, prm in m.named_parameters():
                        if ".norm_" in name and name.endswith(".weight"):
                            prm.uniform_(0.5, 1.5)
            return m
        self._seeded(5)
        return AutoencoderKL(**spec["vae"]).eval()

    def transformer_num_layers(self) -> int:
        """Number of MMDiT blocks, from the config (without building the model)."""
        if self.model is not None:
            cfg = self.model / "transformer" / "config.json"
            if not cfg.is_file():
                raise SystemExit(f"{cfg} does not exist")
            return int(json.loads(cfg.read_text())["num_layers"])
        return int(self.layers or RANDOM_VARIANTS[self.variant]["transformer"]["num_layers"])

    def describe(self) -> str:
        if self.model is not None:
            return str(self.model)
        return (f"random:{self.variant} (seed {self.seed}" + (f", {self.layers} MMDiT blocks" if self.layers else "")
                + (f", {self.text_layers} text encoder layers" if self.text_layers else "") + ")")

    def scheduler_config(self) -> dict:
        if self.model is not None:
            return json.loads((self.model / "scheduler" / "scheduler_config.json").read_text())
        from diffusers import FlowMatchEulerDiscreteScheduler

        return dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=RANDOM_VARIANTS[self.variant]["shift"]).config)

    def model_index(self) -> dict:
        if self.model is not None and (self.model / "model_index.json").is_file():
            return json.loads((self.model / "model_index.json").read_text())
        index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "text_encoder_3": ["transformers", "T5EncoderModel"], "transformer": ["diffusers", "SD3Transformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        tf = self.tokenizers_from / "model_index.json"
        if tf.is_file():
            src = json.loads(tf.read_text())
            for k in ("tokenizer", "tokenizer_2", "tokenizer_3"):
                if k in src:
                    index[k] = src[k]
        return index


# ----------------------------------------------------------------------------------------------------------------
# Export wrappers: fix the graph signature to the names the crate (and optimum) use
# ----------------------------------------------------------------------------------------------------------------


class ClipWrapper(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        o = self.m(input_ids=input_ids, output_hidden_states=True)
        return (o.text_embeds, o.last_hidden_state, *o.hidden_states)


class T5Wrapper(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids).last_hidden_state


class TransformerWrapper(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class SkipLayersTransformerWrapper(torch.nn.Module):
    """The transformer with diffusers' `skip_layers` fixed (skip-layer guidance, SD3.5: the listed MMDiT blocks are
    not run at all; `SD3Transformer2DModel.forward(..., skip_layers=[...])`). The list is a Python constant, so
    the export traces the blocks that run and the skipped blocks' weights do not enter the graph."""

    def __init__(self, m, skip_layers: list[int]):
        super().__init__()
        self.m = m
        self.skip_layers = list(skip_layers)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, timestep=timestep, return_dict=False,
                      skip_layers=self.skip_layers)[0]


# Skip-layer guidance graph: transformer/model_skip_layers.onnx, same signature as transformer/model.onnx, with the
# skipped block indices (sorted, 0-based as diffusers counts) as JSON in the ONNX metadata key `skip_layers`.
SKIP_COMPONENT = "transformer_skip_layers"
SKIP_FILE = "model_skip_layers.onnx"
SKIP_METADATA_KEY = "skip_layers"
# The transformer taking ControlNet residuals (--controlnet-graph): transformer/model_controlnet.onnx.
CONTROLNET_COMPONENT = "transformer_controlnet"
CONTROLNET_FILE = "model_controlnet.onnx"


def parse_skip_layers(text: str) -> list[int]:
    """"7,8,9" -> [7, 8, 9]. Syntax and duplicates only; the range is checked by validate_skip_layers."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or not str(text).strip() or any(t == "" for t in items):
        raise ValueError(f"--skip-layers {text!r}: expected comma-separated block indices, e.g. 7,8,9")
    out = []
    for t in items:
        try:
            out.append(int(t, 10))
        except ValueError:
            raise ValueError(f"--skip-layers {text!r}: {t!r} is not an integer block index") from None
    return out


def validate_skip_layers(layers, num_layers: int) -> list[int]:
    """The skipped MMDiT block indices, sorted: integers in 0..num_layers-1, no duplicates, not empty, not every
    block. Raises ValueError with the reason."""
    layers = list(layers)
    if not layers:
        raise ValueError("skip layers: the list is empty (give at least one block index)")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"skip layers {layers}: {i!r} is not an integer block index")
    bad = [int(i) for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"skip layers {layers}: {bad} outside 0..{num_layers - 1} (the transformer has "
                         f"{num_layers} MMDiT blocks, counted from 0 as diffusers does)")
    dup = sorted({int(i) for i in layers if layers.count(i) > 1})
    if dup:
        raise ValueError(f"skip layers {layers}: {dup} listed more than once")
    if len(layers) >= num_layers:
        raise ValueError(f"skip layers {layers}: every one of the {num_layers} blocks would be skipped")
    return sorted(int(i) for i in layers)


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """The encoder's moments (mean ++ logvar), as optimum's `latent_parameters`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        return h


def export_spec(component: str, module, skip_layers: list[int] | None = None, controlnet: bool = False) -> dict:
    """Wrapper, example inputs, names and dynamic axes of one component. Example inputs are small: every axis that
    varies in use is dynamic, so the example size does not matter. skip_layers (transformer only): the
    skip-layer-guidance graph, same inputs and outputs. controlnet (transformer only): the graph that takes
    ControlNet residuals (docs/controlnet.md: the inputs of model.onnx plus `controlnet_residuals` [N, B, S, D] and
    `controlnet_block_index` int64 [num_layers])."""
    if skip_layers is not None and component != "transformer":
        raise ValueError("skip_layers is for the transformer only")
    if component in ("text_encoder", "text_encoder_2"):
        n_states = module.config.num_hidden_layers + 1
        seq = module.config.max_position_embeddings
        outs = ["text_embeds", "last_hidden_state"] + [f"hidden_states.{i}" for i in range(n_states)]
        ids = torch.randint(0, 1000, (2, seq), dtype=torch.int64)
        ids[:, -1] = module.config.eos_token_id if module.config.eos_token_id < module.config.vocab_size else 1
        dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "text_embeds": {0: "batch_size"}}
        for o in outs[1:]:
            dyn[o] = {0: "batch_size", 1: "sequence_length"}
        return dict(wrapper=ClipWrapper(module), args=(ids,), inputs=["input_ids"], outputs=outs, dynamic_axes=dyn,
                    model_type="clip")
    if component == "text_encoder_3":
        ids = torch.randint(0, min(1000, module.config.vocab_size), (2, 16), dtype=torch.int64)
        dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
               "last_hidden_state": {0: "batch_size", 1: "sequence_length"}}
        return dict(wrapper=T5Wrapper(module), args=(ids,), inputs=["input_ids"], outputs=["last_hidden_state"],
                    dynamic_axes=dyn, model_type="t5")
    if component == "transformer":
        c = module.config
        args = (torch.randn(2, c.in_channels, 8, 8), torch.randn(2, 12, c.joint_attention_dim),
                torch.randn(2, c.pooled_projection_dim), torch.tensor([500.0, 250.0]))
        dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
               "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
               "pooled_projections": {0: "batch_size"}, "timestep": {0: "batch_size"},
               "out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}}
        if controlnet:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from make_controlnet_fixtures import ResidualTransformer, block_index

            inner = c.num_attention_heads * c.attention_head_dim
            tokens = (8 // c.patch_size) ** 2
            args = args + (torch.randn(1, 2, tokens, inner),
                           torch.tensor(block_index(c.num_layers, 1), dtype=torch.int64))
            dyn["controlnet_residuals"] = {0: "residuals", 1: "batch_size", 2: "image_tokens"}
            return dict(wrapper=ResidualTransformer(module), args=args,
                        inputs=["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                "controlnet_residuals", "controlnet_block_index"],
                        outputs=["out_hidden_states"], dynamic_axes=dyn, model_type="mmdit")
        wrapper = TransformerWrapper(module) if skip_layers is None else SkipLayersTransformerWrapper(module,
                                                                                                    skip_layers)
        return dict(wrapper=wrapper, args=args,
                    inputs=["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
                    outputs=["out_hidden_states"], dynamic_axes=dyn, model_type="mmdit")
    if component == "controlnet":
        # An SD3ControlNetModel (docs/controlnet.md: models/export/export_controlnet.py's graph, conditioning scale 1).
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from make_controlnet_fixtures import ControlNetWrapper

        c = module.config
        text = c.joint_attention_dim is not None
        args = [torch.randn(2, c.in_channels, 8, 8), torch.randn(2, c.in_channels, 8, 8), torch.tensor([500.0, 250.0]),
                torch.randn(2, c.pooled_projection_dim)]
        inputs = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections"]
        dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
               "controlnet_cond": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
               "pooled_projections": {0: "batch_size"},
               "controlnet_block_samples": {1: "batch_size", 2: "image_tokens"}}
        if text:
            args.append(torch.randn(2, 12, c.joint_attention_dim))
            inputs.append("encoder_hidden_states")
            dyn["encoder_hidden_states"] = {0: "batch_size", 1: "sequence_length"}
        return dict(wrapper=ControlNetWrapper(module, text), args=tuple(args), inputs=inputs,
                    outputs=["controlnet_block_samples"], dynamic_axes=dyn, model_type="mmdit")
    if component == "vae_decoder":
        c = module.config
        dyn = {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
               "sample": {0: "batch_size", 2: "height", 3: "width"}}
        return dict(wrapper=VaeDecoderWrapper(module), args=(torch.randn(2, c.latent_channels, 8, 12),),
                    inputs=["latent_sample"], outputs=["sample"], dynamic_axes=dyn, model_type="vae")
    if component == "vae_encoder":
        dyn = {"sample": {0: "batch_size", 2: "height", 3: "width"},
               "latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}
        return dict(wrapper=VaeEncoderWrapper(module), args=(torch.randn(2, 3, 64, 96),), inputs=["sample"],
                    outputs=["latent_parameters"], dynamic_axes=dyn, model_type="vae")
    raise ValueError(component)


# ----------------------------------------------------------------------------------------------------------------
# Exporters
# ----------------------------------------------------------------------------------------------------------------


# --torchscript-shape-inference off: the TorchScript exporter's own ONNX shape inference is skipped. It copies the
# weights along with the graph (cProfile of a 2-block SD3.5-large-width transformer: 54% of the export's time), and
# its shapes are not what the export relies on (the fp16 conversion runs ORT's symbolic shape inference); the final
# files were byte-identical with and without it there (torch 2.8). For SD3.5-large's 8B parameters (sd35l.sh).
TORCHSCRIPT_SHAPE_INFERENCE = True


@contextlib.contextmanager
def _exporter_shape_inference(enabled: bool):
    if enabled:
        yield
        return
    import importlib

    globs = None
    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        try:
            globs = importlib.import_module(name).GLOBALS
            break
        except (ImportError, AttributeError):
            continue
    if globs is None or not hasattr(globs, "onnx_shape_inference"):
        log("warning: this torch has no switch for the TorchScript exporter's shape inference; exporting with it")
        yield
        return
    old = globs.onnx_shape_inference
    globs.onnx_shape_inference = False
    try:
        yield
    finally:
        globs.onnx_shape_inference = old


def export_torchscript(spec: dict, opset: int, work: Path) -> Path:
    """torch.onnx.export(dynamo=False) into work/ (large models get their weights written next to the graph)."""
    path = work / "torchscript.onnx"
    kwargs = dict(input_names=spec["inputs"], output_names=spec["outputs"], dynamic_axes=spec["dynamic_axes"],
                  opset_version=opset, do_constant_folding=True, dynamo=False)
    with torch.no_grad(), warnings.catch_warnings(), _exporter_shape_inference(TORCHSCRIPT_SHAPE_INFERENCE):
        warnings.simplefilter("ignore")
        torch.onnx.export(spec["wrapper"], spec["args"], str(path), **kwargs)
    return path


def _dynamo_shapes(spec: dict, component: str, module) -> dict:
    """torch.export dims for the same dynamic axes (Dim.DYNAMIC: torch infers the constraints between them). The
    transformer's height/width are multiples of the patch size (derived dims), the VAE encoder's of 8."""
    Dim = torch.export.Dim
    shapes = {}
    for name in spec["inputs"]:
        entry = {}
        for ax, label in spec["dynamic_axes"].get(name, {}).items():
            if component == "transformer" and name == "hidden_states" and ax in (2, 3):
                p = module.config.patch_size
                mx = module.config.pos_embed_max_size or 4096
                entry[ax] = p * Dim(label + "_patches", min=1, max=mx)
            elif component == "vae_encoder" and ax in (2, 3):
                entry[ax] = 8 * Dim(label + "_8", min=1, max=1024)
            else:
                entry[ax] = Dim.DYNAMIC
        shapes[name] = entry
    return shapes


def export_dynamo(spec: dict, component: str, module, opset: int, work: Path) -> Path:
    """torch.onnx.export(dynamo=True): torch.export + onnxscript. Opset >= 23 emits SDPA as the ONNX `Attention`
    op; below that as MatMul/Softmax."""
    path = work / "dynamo.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(spec["wrapper"], spec["args"], input_names=spec["inputs"],
                                 output_names=spec["outputs"], dynamic_shapes=_dynamo_shapes(spec, component, module),
                                 opset_version=opset, dynamo=True, optimize=True, verbose=False)
        prog.save(str(path), external_data=True)
    del prog
    return path


def name_dynamic_dims(model: onnx.ModelProto, spec: dict):
    """torch.export names the dynamic dims after its symbols (s0, 2*s1, ...); use the optimum-style names."""
    for vi in list(model.graph.input) + list(model.graph.output):
        axes = spec["dynamic_axes"].get(vi.name, {})
        for ax, label in axes.items():
            d = vi.type.tensor_type.shape.dim[ax]
            if not d.HasField("dim_value"):
                d.dim_param = label


# ----------------------------------------------------------------------------------------------------------------
# Graph rewrites
# ----------------------------------------------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto) -> dict:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def _const_value(model: onnx.ModelProto, name: str, producers: dict, inits: dict):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def fold_adaln_into_layernorm(model: onnx.ModelProto) -> int:
    """LayerNormalization(x, ones, zeros) -> Mul(m) -> Add(a)  ==>  LayerNormalization(x, m, a).

    diffusers' AdaLayerNormZero/AdaLayerNormContinuous apply `norm(x) * (1 + scale[:, None]) + shift[:, None]`
    after an affine-free LayerNorm; ONNX Runtime (>= 1.21, CPU and CUDA) broadcasts LayerNormalization's scale and
    bias, so the two elementwise passes over [B, S, D] become part of the normalization kernel. Only applied where
    the LN output feeds nothing but that Mul and the Mul nothing but that Add."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    remove, folded = [], 0
    for ln in list(g.node):
        if ln.op_type != "LayerNormalization" or len(ln.output) != 1 or len(ln.input) < 2:
            continue
        axis = next((a.i for a in ln.attribute if a.name == "axis"), -1)
        if axis != -1:
            continue
        scale = _const_value(model, ln.input[1], producers, inits)
        bias = _const_value(model, ln.input[2], producers, inits) if len(ln.input) > 2 and ln.input[2] else None
        if scale is None or not np.all(scale == 1) or (bias is not None and not np.all(bias == 0)):
            continue
        if len(ln.input) > 2 and ln.input[2] and bias is None:
            continue
        out = ln.output[0]
        if out in graph_outputs or len(consumers.get(out, [])) != 1:
            continue
        mul = consumers[out][0]
        if mul.op_type != "Mul" or mul.output[0] in graph_outputs or len(consumers.get(mul.output[0], [])) != 1:
            continue
        add = consumers[mul.output[0]][0]
        if add.op_type != "Add":
            continue
        m_in = mul.input[1] if mul.input[0] == out else mul.input[0]
        a_in = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
        if m_in == out or a_in == mul.output[0]:
            continue
        new_inputs = [ln.input[0], m_in, a_in]
        del ln.input[:]
        ln.input.extend(new_inputs)
        ln.output[0] = add.output[0]
        remove += [mul, add]
        folded += 1
    for n in remove:
        g.node.remove(n)
    return folded


def ort_optimize(src: onnx.ModelProto, model_type: str) -> onnx.ModelProto:
    """onnxruntime.transformers.optimizer with the python fusions only (opt_level=0), as Microsoft's
    models/stable_diffusion/optimize_pipeline.py does for SD3 before the fp16 conversion."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions(model_type)
    if model_type == "vae":
        # GroupNorm / NHWC Conv fusions are CUDA-only contrib ops (no CPU kernel); keep the graph portable.
        for k in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                  "enable_bias_add"):
            if hasattr(opts, k):
                setattr(opts, k, False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = optimize_model(src, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=opts, use_gpu=True)
        if model_type == "mmdit":
            m.fuse_bias_gelu(is_fastgelu=True)   # FastGelu(x + b) -> FastGelu(x, bias)
            m.fuse_bias_gelu(is_fastgelu=False)  # Gelu(x + b) -> BiasGelu
            m.prune_graph()
    return m.model


def t5_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    """T5 encoder: RMSNorm -> SimplifiedLayerNormalization, residual Add + RMSNorm -> SkipSimplifiedLayerNormalization,
    tanh-GELU -> FastGelu. Not the attention fusion of model_type "t5": it emits com.microsoft RelativePositionBias,
    which has no CPU kernel, and the encoder runs once per prompt, so its attention stays MatMul/Softmax."""
    from onnxruntime.transformers.onnx_model_t5 import T5OnnxModel

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = T5OnnxModel(model)
        m.utils.remove_identity_nodes()
        m.utils.remove_useless_cast_nodes()
        m.fuse_layer_norm()
        m.fuse_skip_layer_norm()
        m.fuse_gelu()
        m.prune_graph()
        m.remove_unused_constant()
    return m.model


def raise_opset_for_layernorm(model: onnx.ModelProto):
    """The fused LayerNormalization nodes are ONNX ops only from opset 17 (ONNX Runtime also runs them at 16, other
    runtimes and onnx.checker do not). Opset 17 only added operators to 16, so declaring 17 changes nothing else."""
    if any(n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 17:
                o.version = 17
    # The fusions add com.microsoft nodes without always declaring the domain.
    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")} - declared):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def fuse_bias_gelu_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """For dynamo graphs: Add(bias) -> Gelu/FastGelu becomes BiasGelu/FastGelu(bias) (onnxruntime's fusion)."""
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    with contextlib.redirect_stderr(io.StringIO()):
        m = BertOnnxModel(model)
        m.fuse_bias_gelu(is_fastgelu=True)
        m.fuse_bias_gelu(is_fastgelu=False)
        m.prune_graph()
    return m.model


def groupnorm_as_instancenorm(model: onnx.ModelProto) -> int:
    """Rewrites every ONNX `GroupNormalization` (opset >= 21: scale and bias per channel) as
    Reshape [N, G, -1] -> InstanceNormalization -> Reshape [N, C, -1] -> Mul(scale) -> Add(bias) -> Reshape back,
    the form the TorchScript exporter writes; returns how many were rewritten.

    Not the default (export_sd3.py --groupnorm onnx since 2026-12-04, second change that day). It was written
    because ONNX Runtime 1.31.1 has no kernel for GroupNormalization on the CPU nor on CUDA (the node is an ONNX
    function, inlined as about 25 primitive nodes) and the dynamo exporter at opset 23 writes the VAE's 30 group
    norms that way. Measured on an H200 (docs/gpu-results/2026-12-04-h200-round23/vae.txt, one call, same random
    SD3-medium weights and latents, 1024x1024): the VAE decode took 3,969 ms with this rewrite, 72.8 ms with
    GroupNormalization kept and 83.1 ms with TorchScript's decoder (InstanceNormalization at opset 17). The
    profile shows why: the 30 rewritten InstanceNormalization nodes ran on the CPU provider (30 MemcpyToHost and
    30 MemcpyFromHost nodes, and 60 Casts; the same export on the dev CPU has one Cast: ONNX Runtime puts casts to
    float32 around float16 nodes it places on the CPU), while TorchScript's InstanceNormalization ran on CUDA. The
    likely difference is the op's version (22 at opset 23, 6 at opset 17); not checked further. Rank-agnostic
    (the VAE's attention normalises [B, C, HW]); the per-channel scale and bias are applied on the [N, C, -1] view.
    Graphs below opset 21 (GroupNormalization-18: scale and bias per group) are left as they are."""
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [0])
    if opset < 21:
        return 0
    inits = {t.name: t for t in model.graph.initializer}
    out, done = [], 0
    for n in model.graph.node:
        if n.op_type != "GroupNormalization" or n.domain not in ("", "ai.onnx") or len(n.input) != 3:
            out.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        groups = int(attrs["num_groups"])
        eps = float(attrs.get("epsilon", 1e-5))
        scale = inits.get(n.input[1])
        if scale is None or len(scale.dims) != 1:
            out.append(n)  # a computed scale: leave it (never seen in the exporters' graphs)
            continue
        channels = int(scale.dims[0])
        base = (n.output[0] or f"gn{done}") + ".gn"
        consts = {
            ".groups_shape": np.array([0, groups, -1], dtype=np.int64),
            ".channels_shape": np.array([0, channels, -1], dtype=np.int64),
            ".axis1": np.array([1], dtype=np.int64),
        }
        model.graph.initializer.extend(numpy_helper.from_array(v, base + k) for k, v in consts.items())
        # InstanceNormalization's own scale and bias (identity), in the data type of the group norm's
        model.graph.initializer.extend([helper.make_tensor(base + ".ones", scale.data_type, [groups], [1.0] * groups),
                                        helper.make_tensor(base + ".zeros", scale.data_type, [groups], [0.0] * groups)])
        x, y = n.input[0], n.output[0]
        out += [
            helper.make_node("Shape", [x], [base + ".shape"]),
            helper.make_node("Reshape", [x, base + ".groups_shape"], [base + ".grouped"]),
            helper.make_node("InstanceNormalization", [base + ".grouped", base + ".ones", base + ".zeros"],
                             [base + ".normed"], epsilon=eps),
            helper.make_node("Reshape", [base + ".normed", base + ".channels_shape"], [base + ".per_channel"]),
            helper.make_node("Unsqueeze", [n.input[1], base + ".axis1"], [base + ".scale"]),
            helper.make_node("Unsqueeze", [n.input[2], base + ".axis1"], [base + ".bias"]),
            helper.make_node("Mul", [base + ".per_channel", base + ".scale"], [base + ".scaled"]),
            helper.make_node("Add", [base + ".scaled", base + ".bias"], [base + ".shifted"]),
            helper.make_node("Reshape", [base + ".shifted", base + ".shape"], [y]),
        ]
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(out)
    return done


# ----------------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------------


def t5_fp32_nodes(model: onnx.ModelProto, d_ff: int) -> tuple[list[str], list[str]]:
    """(node names, op types) kept in float32 in T5 `mixed` precision.

    T5 v1.1 (XXL) in fp16 overflows: the feed-forward output `wo(gelu(wi_0 x) * wi_1 x)` and the residual stream
    it is added to exceed 65504 (transformers keeps `wo` in fp32 for that reason: T5 `_keep_in_fp32_modules`, and
    clamps the residual in fp16). Here: every `wo` MatMul (found by its weight shape [d_ff, d_model], so renamed
    modules do not matter), every residual Add and every RMSNorm (fused SkipSimplifiedLayerNormalization /
    SimplifiedLayerNormalization, or the unfused Pow/ReduceMean/Sqrt/Div chain) stay fp32. The q/k/v/o and wi
    projections (2/3 of the weights) and attention run in fp16."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) == 2 and dims[0] == d_ff:
                nodes.append(n.name)
    ops = ["SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Add", "Pow",
           "ReduceMean", "Sqrt",
           "Div", "Reciprocal"]
    return nodes, ops


def time_projection_nodes(model: onnx.ModelProto) -> list[str]:
    """The sinusoidal timestep embedding (diffusers Timesteps / get_timestep_embedding computes it in float32 and
    casts the result): every node between the `timestep` input and the first MatMul/Gemm (the MLP)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names, frontier, seen = [], ["timestep"], set()
    while frontier:
        t = frontier.pop()
        for n in consumers.get(t, []):
            if n.name in seen or n.op_type in ("MatMul", "Gemm", "FusedMatMul"):
                continue
            seen.add(n.name)
            names.append(n.name)
            frontier.extend(n.output)
    return names


INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8,
             TensorProto.BOOL}


def index_math_nodes(model: onnx.ModelProto) -> list[str]:
    """Float arithmetic that computes integer indices: every node on a path from a Cast int->float to a Cast
    float->int. T5's relative-position buckets are `long(max_exact + log(rel / max_exact) / log(...) * ...)`;
    transformers computes that in float32 whatever the model dtype, and in float16 buckets at the boundaries move,
    which changes the position bias (an error of ~0.1 on the tiny test T5). Such nodes stay float32."""
    g = model.graph
    consumers: dict[str, list] = {}
    producers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producers[o] = n

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    starts = [n for n in g.node if n.op_type == "Cast" and cast_to(n) in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    ends = [n for n in g.node if n.op_type == "Cast" and cast_to(n) in INT_TYPES]
    fwd, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n.name in fwd:
            continue
        fwd.add(n.name)
        if n in ends:
            continue
        for o in n.output:
            stack.extend(consumers.get(o, []))
    bwd, stack = set(), list(ends)
    while stack:
        n = stack.pop()
        if n.name in bwd:
            continue
        bwd.add(n.name)
        for i in n.input:
            if i in producers:
                stack.append(producers[i])
    return sorted(fwd & bwd)


def constants_feeding(model: onnx.ModelProto, blocked: set, blocked_ops: set) -> list[str]:
    """Constant nodes whose every consumer stays float32: they must stay float32 too, else their value is rounded
    to float16 before the consumer casts it back (e.g. T5's 1/log(max_distance/max_exact) bucket factor)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type != "Constant" or n.name in blocked:
            continue
        users = consumers.get(n.output[0], [])
        if users and all(u.name in blocked or u.op_type in blocked_ops for u in users):
            out.append(n.name)
    return out


def ensure_node_names(model: onnx.ModelProto):
    used = {n.name for n in model.graph.node if n.name}
    k = 0
    for n in model.graph.node:
        if not n.name:
            while f"{n.op_type}_auto_{k}" in used:
                k += 1
            n.name = f"{n.op_type}_auto_{k}"
            used.add(n.name)


def to_half(model: onnx.ModelProto, component: str, dtype: str, t5_precision: str, d_ff: int | None) -> tuple[onnx.ModelProto, dict]:
    """float32 graph -> fp16/bf16 graph (inputs and outputs too, except the transformer's `timestep`)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    ensure_node_names(model)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.data_type == TensorProto.FLOAT and not _is_stub(t)} if dtype == "bf16" else {}
    op_block = list(DEFAULT_OP_BLOCK_LIST)
    node_block: list[str] = []
    keep_io: list[str] = []
    info = {}
    node_block += index_math_nodes(model)
    if component in ("transformer", "controlnet"):
        keep_io = ["timestep"]
        node_block += time_projection_nodes(model)
    if component == "text_encoder_3" and t5_precision == "mixed":
        nodes, ops = t5_fp32_nodes(model, d_ff)
        if not nodes:
            raise SystemExit("T5 mixed precision: found no feed-forward output MatMul (weight [d_ff, d_model]); "
                             "use --t5-precision fp32")
        node_block += nodes
        op_block += ops
    if dtype == "bf16":
        op_block += ops_without_bf16(model)
        info["bf16_blocked_ops"] = ops_without_bf16(model)
    node_block += constants_feeding(model, set(node_block), set(op_block))
    info["fp32_nodes"] = len(set(node_block)) + sum(1 for n in model.graph.node if n.op_type in op_block
                                                    and n.name not in set(node_block))
    # The converter reads every initializer's values only to get its shape: use the dims (stubs have no values).
    for mod in {sys.modules.get("float16"), sys.modules.get("onnxruntime.transformers.float16")} - {None}:
        mod.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    m = OnnxModel(model)
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.convert_float_to_float16(keep_io_types=keep_io, op_block_list=op_block, node_block_list=node_block,
                                   use_symbolic_shape_infer=True)
    out = m.model
    drop_duplicate_nodes(out)
    topological_sort(out)
    if dtype == "bf16":
        retype_fp16_to_bf16(out, originals)
    return out, info


def ops_without_bf16(model: onnx.ModelProto) -> list[str]:
    """Op types of the graph whose schema (at the graph's opset, as ONNX Runtime registers it, contrib ops included)
    has no bfloat16 type: they stay float32 in a bf16 export (e.g. Conv, Sin, Cos, InstanceNormalization)."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = [(s.domain or "", s.name, s.since_version, [t.allowed_type_strs for t in s.type_constraints])
                   for s in C.get_all_operator_schema()]
    except Exception:  # noqa: BLE001
        schemas = [(s.domain or "", s.name, s.since_version, [t.allowed_type_strs for t in s.type_constraints])
                   for s in onnx.defs.get_all_schemas_with_history()]
    best: dict = {}
    for domain, name, since, types in schemas:
        domain = "" if domain == "ai.onnx" else domain
        if since <= opsets.get(domain, 1) and since >= best.get((domain, name), (-1, None))[0]:
            best[(domain, name)] = (since, types)
    out = set()
    for n in model.graph.node:
        key = ("" if n.domain in ("", "ai.onnx") else n.domain, n.op_type)
        if key not in best:
            continue
        types = best[key][1]
        if types and not any("tensor(bfloat16)" in t for t in types):
            out.add(n.op_type)
    return sorted(out)


def drop_duplicate_nodes(model: onnx.ModelProto):
    """float16.convert_float_to_float16 adds one `<x>_cast_to_fp32` Cast per blocked consumer of x, all with the same
    node and output name when x feeds several blocked nodes; keep the first (they are identical)."""
    g = model.graph
    seen, keep = set(), []
    for n in g.node:
        key = (n.op_type, n.domain, tuple(n.input), tuple(n.output), n.SerializeToString(deterministic=True))
        out_key = tuple(n.output)
        if key in seen or (n.op_type == "Cast" and ("cast", out_key) in seen):
            continue
        seen.add(key)
        if n.op_type == "Cast":
            seen.add(("cast", out_key))
        keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    names = set()
    vis = []
    for vi in g.value_info:
        if vi.name not in names:
            names.add(vi.name)
            vis.append(vi)
    del g.value_info[:]
    g.value_info.extend(vis)


def topological_sort(model: onnx.ModelProto):
    """Nodes in an order where every input is produced before use (the fp16 converter appends some Casts after
    their consumers; ONNX Runtime accepts that, onnx.checker does not)."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producers = {}
    for idx, n in enumerate(g.node):
        for o in n.output:
            producers[o] = idx
    order, placed = [], [False] * len(g.node)
    import collections

    deps = []
    for n in g.node:
        deps.append({producers[i] for i in n.input if i not in available and i in producers})
    users = collections.defaultdict(list)
    missing = [len(d) for d in deps]
    for idx, d in enumerate(deps):
        for p in d:
            users[p].append(idx)
    queue = collections.deque(i for i, m in enumerate(missing) if m == 0)
    while queue:
        i = queue.popleft()
        if placed[i]:
            continue
        placed[i] = True
        order.append(g.node[i])
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                queue.append(u)
    if len(order) == len(g.node):
        nodes = [onnx.NodeProto() for _ in order]
        for dst, src in zip(nodes, order):
            dst.CopyFrom(src)
        del g.node[:]
        g.node.extend(nodes)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(a.astype(np.float32))
    bits = rounded.astype(np.uint16)
    bits[nan] = 0x7FC0
    return bits


def _bf16_tensor(name: str, a: np.ndarray) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(a.shape))
    t.raw_data = _bf16_bits(a).tobytes()
    return t


def retype_fp16_to_bf16(model: onnx.ModelProto, originals: dict):
    """Every float16 in a converted graph becomes bfloat16; initializers are re-rounded from their float32 values
    (not from the fp16 ones, which were clipped to +-65504)."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for i, t in enumerate(list(g.initializer)):
        if t.data_type == TensorProto.FLOAT16 and _is_stub(t):
            t.data_type = TensorProto.BFLOAT16  # save_streaming rounds its float32 bytes to bf16
            continue
        if t.data_type == TensorProto.FLOAT16:
            src = originals.get(t.name)
            a = src if src is not None and src.shape == tuple(t.dims) else numpy_helper.to_array(t).astype(np.float32)
            g.initializer[i].CopyFrom(_bf16_tensor(t.name, a))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(_bf16_tensor(a.t.name, numpy_helper.to_array(a.t).astype(np.float32)))


# ----------------------------------------------------------------------------------------------------------------
# Saving, manifest
# ----------------------------------------------------------------------------------------------------------------


# Big graphs are processed without their weights in memory: after the export, every initializer over 1 KiB is
# moved to work/weights.bin and the graph keeps "stubs" (external-data references, float32 bytes). The optimizer,
# the passes and the float16 converter only look at the graph (the few small tensors they read, e.g. LayerNorm
# weights, are read from the file: the working directory is work/ meanwhile); the converter retypes stubs without
# touching their bytes. save_streaming then converts each stub's float32 bytes to its final type, one tensor at a
# time, while writing the output. Peak memory: about one copy of the weights (during the torch export).
WEIGHTS_FILE = "weights.bin"
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
            TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.INT8: np.int8,
            TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_}


def _is_stub(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and not t.raw_data


def _ext(t: TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


@contextlib.contextmanager
def working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def externalize(exported: Path, work: Path, in_place: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Loads the exported graph (and its weights) once, writes every initializer over 1 KiB to work/weights.bin and
    returns the graph with stubs, plus {(file, offset): original data type} of the stubs.

    in_place: when the exporter has already written the weights to files in work/ (the TorchScript exporter does
    for models over 2 GB: one file per tensor, small tensors inline), those files are the stubs' data as they are:
    no load and second copy of the weights (SD3.5-large's transformer: 32.5 GB less to read and write, and less
    memory). Only used for the TorchScript exporter's files (the ones checked: same output files)."""
    model = onnx.load(str(exported), load_external_data=False)
    ext = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if in_place and ext and all(_ext(t).get("location") and Path(_ext(t)["location"]).name == _ext(t)["location"]
                   and (work / _ext(t)["location"]).is_file() for t in ext):
        types = {}
        for t in ext:
            e = _ext(t)
            offset = int(e.get("offset", 0))
            length = int(e["length"]) if "length" in e else (work / e["location"]).stat().st_size - offset
            del t.external_data[:]
            for k, v in (("location", e["location"]), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            types[(e["location"], offset)] = t.data_type
        return model, types
    del model
    model = onnx.load(str(exported), load_external_data=True)
    for f in list(work.iterdir()):  # the exporter's files: in memory now
        f.unlink()
    onnx.save_model(model, str(work / "stub.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS_FILE, size_threshold=1024, convert_attribute=False)
    del model
    gc.collect()
    model = onnx.load(str(work / "stub.onnx"), load_external_data=False)
    types = {(WEIGHTS_FILE, int(_ext(t).get("offset", 0))): t.data_type for t in model.graph.initializer if _is_stub(t)}
    return model, types


def _fp16_like_converter(a: np.ndarray, min_positive=5.96e-08, max_finite=65504.0) -> np.ndarray:
    """float32 -> float16 exactly as onnxruntime.transformers.float16.convert_np_to_float16 (tiny values to
    +-min_positive, finite values beyond the range to +-max_finite, inf and nan unchanged)."""
    x = np.array(a, dtype=np.float32)
    x[(x > 0) & (x < min_positive)] = min_positive
    x[(x < 0) & (x > -min_positive)] = -min_positive
    finite = np.isfinite(x)
    x[finite] = np.clip(x[finite], -max_finite, max_finite)
    return x.astype(np.float16)


def _stub_bytes(t: TensorProto, src_types: dict, work: Path) -> bytes:
    e = _ext(t)
    offset, length = int(e.get("offset", 0)), int(e["length"])
    src_type = src_types.get((e["location"], offset), t.data_type)
    src = np.memmap(work / e["location"], dtype=NP_TYPES[src_type], mode="r", offset=offset,
                    shape=(length // np.dtype(NP_TYPES[src_type]).itemsize,))
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if src.size != n:
        raise RuntimeError(f"initializer {t.name}: {src.size} stored values for dims {list(t.dims)}")
    if t.data_type == src_type:
        return np.asarray(src).tobytes()
    if src_type == TensorProto.FLOAT and t.data_type == TensorProto.FLOAT16:
        return _fp16_like_converter(src).tobytes()
    if src_type == TensorProto.FLOAT and t.data_type == TensorProto.BFLOAT16:
        return _bf16_bits(np.asarray(src)).tobytes()
    raise RuntimeError(f"initializer {t.name}: cannot convert {src_type} to {t.data_type}")


def _tensor_nbytes(t: TensorProto) -> int:
    if _is_stub(t):
        item = {TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}.get(t.data_type)
        item = item or np.dtype(NP_TYPES.get(t.data_type, np.float32)).itemsize
        return int(np.prod(t.dims)) * item if len(t.dims) else item
    return len(t.raw_data) if t.raw_data else t.ByteSize()


class _WorkFileReleaser:
    """Gives the disk blocks of the stubs' data in work/ (weights.bin, or the exporter's own files: externalize) back
    once save_streaming has read them (fallocate PUNCH_HOLE, Linux; elsewhere, or on a filesystem without it,
    nothing happens). Without this the float32 working data and the float16 output coexist on disk: 1.5x the
    float32 weights at the end of the save (SD3.5-large's 8B-parameter transformer: 32.5 + 16.3 GB); with it the
    peak stays at about the float32 weights. A range is released only after its last reader (initializers may
    share one) and only if no other stub overlaps it."""

    def __init__(self, stubs: list, work: Path | None):
        self.pending = Counter((_ext(t)["location"], int(_ext(t).get("offset", 0)), int(_ext(t)["length"]))
                               for t in stubs)
        self.freed = 0
        self.fallocate = None
        if work is None or not sys.platform.startswith("linux") or not self.pending:
            return
        by_file: dict = {}
        for loc, off, n in self.pending:
            by_file.setdefault(loc, []).append((off, off + n))
        for ranges in by_file.values():
            ranges.sort()
            if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
                return  # overlapping stubs: keep everything
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            self.fallocate = libc.fallocate
        except (OSError, AttributeError):
            return
        self.work = work

    def read(self, t: TensorProto):
        key = (_ext(t)["location"], int(_ext(t).get("offset", 0)), int(_ext(t)["length"]))
        self.pending[key] -= 1
        if self.fallocate is None or self.pending[key] > 0:
            return
        loc, off, n = key
        fd = os.open(self.work / loc, os.O_RDWR)
        try:
            # FALLOC_FL_PUNCH_HOLE (2) | FALLOC_FL_KEEP_SIZE (1): the offsets of the other stubs stay valid
            if self.fallocate(fd, 3, off, n) != 0:
                self.fallocate = None  # not supported here (e.g. EOPNOTSUPP): keep the file as it is
            else:
                self.freed += n
        finally:
            os.close(fd)


def save_streaming(model: onnx.ModelProto, path: Path, force_external: bool | None, src_types: dict,
                   work: Path | None) -> list[Path]:
    """Writes model.onnx (and model.onnx.data when the weights exceed ~1.8 GB or force_external), materializing
    stubs tensor by tensor (and releasing the working file's blocks behind them: _WorkFileReleaser)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    total = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    external = total > EXTERNAL_DATA_THRESHOLD if force_external is None else force_external
    f = open(data, "wb") if external else None
    releaser = _WorkFileReleaser([t for t in model.graph.initializer if _is_stub(t)], work)
    try:
        for t in model.graph.initializer:
            if _is_stub(t):
                raw = _stub_bytes(t, src_types, work)
                releaser.read(t)
            elif external and t.data_location != TensorProto.EXTERNAL and _tensor_nbytes(t) >= 1024:
                raw = numpy_helper.to_array(t).tobytes() if not t.raw_data else t.raw_data
            else:
                if t.data_location == TensorProto.EXTERNAL:  # read by a fusion: its bytes are in raw_data
                    t.data_location = TensorProto.DEFAULT
                    del t.external_data[:]
                continue
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            del t.external_data[:]
            if f is not None and len(raw) >= 1024:
                pad = (-f.tell()) % 64
                f.write(b"\0" * pad)
                offset = f.tell()
                f.write(raw)
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            else:
                t.data_location = TensorProto.DEFAULT
                t.raw_data = raw
    finally:
        if f is not None:
            f.close()
    if releaser.freed >= 2**26:
        log(f"[save] released {releaser.freed / 2**30:.1f} GiB of float32 working data while saving")
    onnx.save_model(model, str(path))
    return [path, data] if external else [path]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                "onnx-ir", "numpy"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def signature(model: onnx.ModelProto) -> dict:
    def port(vi):
        t = vi.type.tensor_type
        return dict(name=vi.name, dtype=TensorProto.DataType.Name(t.elem_type).lower(),
                    shape=[d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim])

    return dict(inputs=[port(i) for i in model.graph.input], outputs=[port(o) for o in model.graph.output])


# ----------------------------------------------------------------------------------------------------------------
# One component
# ----------------------------------------------------------------------------------------------------------------


def default_opset(exporter: str, attention: str) -> int:
    if exporter == "dynamo":
        return 23 if attention == "fused" else 18
    return 16 if attention == "fused" else 17


def _phase(component: str, what: str, t0: float):
    """Progress of one component's export: seconds since t0 and the process's peak resident memory so far (for the
    big graphs: SD3.5-large's 8B-parameter transformer takes minutes and tens of GB); quiet for the first 5 s."""
    if time.time() - t0 < 5:
        return
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        log(f"[{component}] {what}: {time.time() - t0:.1f} s, peak RSS {peak:.1f} GiB")
    except (ImportError, ValueError):  # not on Linux/macOS
        log(f"[{component}] {what}: {time.time() - t0:.1f} s")


def release_weights(module: torch.nn.Module):
    """Frees a module's parameters and buffers (the export of a big model then holds one copy of the weights)."""
    for t in list(module.parameters()) + list(module.buffers()):
        t.data = torch.empty(0, dtype=t.dtype)
    gc.collect()


def export_component(component: str, module, out_dir: Path, *, exporter: str, attention: str, dtype: str,
                     opset: int | None, t5_precision: str, external: bool | None = None,
                     release_torch: bool = False, skip_layers: list[int] | None = None,
                     keep_token_ids: list[int] | None = None, weights_fp16: bool = False,
                     weights_int8: bool = False, keep_t5_token_ids: list[int] | None = None,
                     fused_kernels: bool = False, controlnet_graph: bool = False,
                     groupnorm: str = "onnx") -> dict:
    """Exports one PyTorch module to out_dir/<component>/model.onnx. Returns its manifest entry. With
    release_torch, the module's weights are freed once the ONNX graph is written (the module is unusable after).

    skip_layers (component "transformer" only): the skip-layer-guidance graph instead, out_dir/transformer/
    model_skip_layers.onnx: the same export, rewrites and precision conversion as model.onnx, of a wrapper that
    calls the transformer with `skip_layers=[...]` fixed; the sorted list is stored as JSON in the ONNX metadata
    key `skip_layers`.

    controlnet_graph (component "transformer" only): out_dir/transformer/model_controlnet.onnx instead, the
    transformer that adds ControlNet residuals after its blocks (docs/controlnet.md), through the same rewrites and
    precision conversion as model.onnx.

    groupnorm (dynamo exports): "onnx" (default) keeps ONNX GroupNormalization nodes; "instancenorm" rewrites them
    as InstanceNormalization (groupnorm_as_instancenorm; 55x slower VAE decode on CUDA, see there)."""
    t0 = time.time()
    opset = opset or default_opset(exporter, attention)
    filename = "model.onnx"
    if controlnet_graph:
        if component != "transformer" or skip_layers is not None:
            raise ValueError("controlnet_graph is for the transformer only, without skip_layers")
        filename = CONTROLNET_FILE
    if skip_layers is not None:
        if component != "transformer":
            raise ValueError("skip_layers is for the transformer only")
        skip_layers = validate_skip_layers(skip_layers, module.config.num_layers)
        filename = SKIP_FILE
    spec = export_spec(component, module, skip_layers, controlnet=controlnet_graph)
    info: dict = dict(exporter=exporter, opset=opset, attention=attention, dtype=dtype)
    fuse = None
    if fused_kernels and ((component == "transformer" and skip_layers is None) or component == "controlnet"):
        if dtype != "fp16" or exporter != "torchscript":
            raise SystemExit("error: --fused-kernels needs --dtype fp16 and the torchscript exporter")
        cfg = module.config
        if component == "controlnet" and cfg.joint_attention_dim is None:
            raise SystemExit("error: --fused-kernels: this ControlNet is of the SD3.5 kind (no text input; its "
                             "blocks are SD3SingleTransformerBlocks, which the rewrite does not cover): export it "
                             "without --fused-kernels")
        # the residual transformer (controlnet_graph) too: fused_kernels.py adds the residuals between the blocks
        fuse = (cfg.num_layers, cfg.num_attention_heads, cfg.num_attention_heads * cfg.attention_head_dim,
                component == "controlnet")
    if skip_layers is not None:
        info["skip_layers"] = skip_layers
    with tempfile.TemporaryDirectory(prefix=f"export-{component}-") as tmp:
        work = Path(tmp)
        if exporter == "dynamo":
            exported = export_dynamo(spec, component, module, opset, work)
        else:
            exported = export_torchscript(spec, opset, work)
        _phase(component, f"{exporter} export", t0)
        d_ff = getattr(getattr(module, "config", None), "d_ff", None)
        module_vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        axes = {"dynamic_axes": spec["dynamic_axes"]}
        del spec
        if release_torch:
            release_weights(module)
        info["nodes_exported"] = op_counts(onnx.load(str(exported), load_external_data=False))
        model, src_types = externalize(exported, work, in_place=exporter == "torchscript")
        _phase(component, "weights in the working file(s)", t0)
        with working_dir(work):
            if attention == "fused" and exporter == "torchscript" and component != "text_encoder_3":
                model = ort_optimize(model, export_spec_model_type(component))
            if exporter == "dynamo":
                name_dynamic_dims(model, axes)
                if groupnorm == "instancenorm":
                    info["groupnorm_as_instancenorm"] = groupnorm_as_instancenorm(model)
            if attention == "fused":
                if component == "text_encoder_3":
                    model = t5_fusions(model)
                elif exporter == "dynamo":
                    model = fuse_bias_gelu_only(model)
                raise_opset_for_layernorm(model)
                if component == "transformer":
                    info["adaln_folded"] = fold_adaln_into_layernorm(model)
            info["nodes_optimized"] = op_counts(model)
            _phase(component, "graph optimized", t0)
            if dtype in ("fp16", "bf16") and not (component == "text_encoder_3" and t5_precision == "fp32"):
                model, extra = to_half(model, component, dtype, t5_precision, d_ff)
                info.update(extra)
                _phase(component, f"{dtype} conversion", t0)
            if fuse is not None:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from fused_kernels import fuse_mmdit

                info["fused_kernels"] = fuse_mmdit(model, *fuse)
                topological_sort(model)
            if component == "text_encoder_3":
                info["t5_precision"] = t5_precision if dtype != "fp32" else "fp32"
            if keep_token_ids is not None and component in ("text_encoder", "text_encoder_2"):
                info["pruned_vocabulary"] = prune_token_embedding(
                    model, module_vocab, keep_token_ids, lambda t: _read_initializer(t, src_types, work))
            if keep_t5_token_ids is not None and component == "text_encoder_3":
                info["pruned_vocabulary"] = prune_token_embedding(
                    model, module_vocab, keep_t5_token_ids, lambda t: _read_initializer(t, src_types, work))
            if weights_int8 and dtype == "fp32":
                q = store_weights_int8(model, lambda t: _read_initializer(t, src_types, work))
                q.pop("scales")  # float16 values (quantize_int8): stored as float16 below like any weight
                info["weight_storage_int8"] = q
            if (weights_fp16 or weights_int8) and dtype == "fp32":
                # with int8 weights, vectors (biases, norm weights) stay float32: some are not the module's own
                # values but sums made by the graph rewrites (the adaLN fold adds 1 to the scale biases), whose
                # float16 rounding no PyTorch-side emulation would reproduce (models/nano/parity_diffusers.py)
                info["weight_storage"] = store_weights_fp16(model, lambda t: _read_initializer(t, src_types, work),
                                                            min_ndim=2 if weights_int8 else 1)
            model.producer_name = "sd3-onnx models/export/export_sd3.py"
            if skip_layers is not None:
                set_metadata(model, SKIP_METADATA_KEY, json.dumps(skip_layers))
            files = save_streaming(model, (out_dir / component / filename).resolve(), external, src_types, work)
            _phase(component, "saved", t0)
        info["nodes_final"] = op_counts(model)
        info["node_count"] = len(model.graph.node)
        info["signature"] = signature(model)
        info["files"] = [str(f.relative_to(out_dir.resolve())) for f in files]
    info["seconds"] = round(time.time() - t0, 1)
    return info


def _read_initializer(t: TensorProto, src_types: dict, work: Path) -> np.ndarray:
    """An initializer's values, whether in memory or a stub of externalize()."""
    if _is_stub(t):
        raw = _stub_bytes(t, src_types, work)
        return np.frombuffer(raw, dtype=NP_TYPES[t.data_type]).reshape(tuple(t.dims)).copy()
    return numpy_helper.to_array(t)


def prune_token_embedding(model: onnx.ModelProto, vocab_size: int, keep: list[int], read) -> dict:
    """Keeps only the listed rows of the token-embedding table (the Gather whose data is a [vocab_size, D]
    initializer): the table becomes [len(keep) + 1, D] and an id map sends every other id to the last row, the
    mean of the dropped rows.

    Exact for prompts whose tokens are all kept; for a model trained only on captions whose tokens are the kept
    ones (models/nano), every other row was never updated from its random initialisation anyway."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= vocab_size:
        raise ValueError(f"token ids to keep must be within 0..{vocab_size - 1}")
    hits = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and list(inits[n.input[0]].dims)[:1] == [vocab_size] and len(inits[n.input[0]].dims) == 2]
    if len(hits) != 1:
        raise ValueError(f"expected one token-embedding Gather over a [{vocab_size}, D] table, found {len(hits)}")
    node = hits[0]
    table = read(inits[node.input[0]])
    mask = np.ones(vocab_size, dtype=bool)
    mask[keep] = False
    rest = table[mask].mean(axis=0, keepdims=True) if mask.any() else np.zeros((1, table.shape[1]), table.dtype)
    small = np.concatenate([table[keep], rest]).astype(table.dtype)
    # The id map (every id -> its row) is built in the graph from the kept ids alone, so the file does not hold a
    # [vocab_size] table: ScatterElements(fill = len(keep), at kept ids, values 0..len(keep)-1); ONNX Runtime folds
    # it to a constant when it loads the graph.
    base = node.input[0]
    model.graph.initializer.remove(inits[base])
    model.graph.initializer.extend([
        numpy_helper.from_array(small, base + ".kept"),
        numpy_helper.from_array(np.array(keep, dtype=np.int64), base + ".kept_ids"),
        numpy_helper.from_array(np.arange(len(keep), dtype=np.int32), base + ".kept_rows"),
        numpy_helper.from_array(np.array([vocab_size], dtype=np.int64), base + ".vocab_size"),
    ])
    ids = node.input[1]
    fill = onnx.helper.make_node("ConstantOfShape", [base + ".vocab_size"], [base + ".id_map_fill"],
                                 value=numpy_helper.from_array(np.array([len(keep)], dtype=np.int32)),
                                 name=base + ".id_map_fill")
    scatter = onnx.helper.make_node("ScatterElements", [base + ".id_map_fill", base + ".kept_ids", base + ".kept_rows"],
                                    [base + ".id_map"], axis=0, name=base + ".id_map")
    remap = onnx.helper.make_node("Gather", [base + ".id_map", ids], [base + ".ids_kept"], axis=0,
                                  name=base + ".remap")
    node.input[0] = base + ".kept"
    node.input[1] = base + ".ids_kept"
    at = list(model.graph.node).index(node)
    model.graph.node.insert(at, remap)
    model.graph.node.insert(at, scatter)
    model.graph.node.insert(at, fill)
    return dict(vocab=vocab_size, kept=len(keep))


def quantize_int8(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 of a float32 weight along `axis` (the output channels): scale = max|w| / 127
    over the other axes (1 for an all-zero channel) rounded to the nearest float16, q = round(w / scale), half to
    even, clipped to -127..127.
    DequantizeLinear(q, scale, axis) gives back q * scale. models/nano/parity_diffusers.py applies the same
    rounding to the PyTorch weights (`dequantize_int8_like_export`)."""
    a = np.asarray(a, dtype=np.float32)
    other = tuple(i for i in range(a.ndim) if i != axis)
    amax = np.abs(a).max(axis=other, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    # rounded to float16 values, so store_weights_fp16 can store the scales too without changing them
    scale = scale.astype(np.float16).astype(np.float32)
    q = np.clip(np.round(a / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


def weights_as_stored_int8(module: torch.nn.Module, min_elements: int = 256):
    """Sets a PyTorch module's weights, in place, to the values a `--dtype fp32 --weights-int8` export of it holds:
    Linear/Conv weights of at least min_elements values through quantize_int8 (per output channel) and back, other
    parameters and floating-point buffers of at least min_elements values and two or more dimensions rounded to
    float16 and back, vectors unchanged (what store_weights_int8 + store_weights_fp16(min_ndim=2) store). Used as the
    reference for such exports (test_export.py int8, models/nano/parity_diffusers.py)."""
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if p.numel() < min_elements:
                    continue
                if name == "weight" and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    q, scale = quantize_int8(p.detach().float().numpy(), axis=0)
                    deq = q.astype(np.float32) * scale.reshape((-1,) + (1,) * (p.dim() - 1))
                    p.copy_(torch.from_numpy(deq))
                elif p.dim() >= 2:
                    p.copy_(p.half().float())
            for b in m.buffers(recurse=False):  # e.g. the transformer's positional embedding table
                if b.is_floating_point() and b.numel() >= min_elements and b.dim() >= 2:
                    b.copy_(b.half().float())


def store_weights_int8(model: onnx.ModelProto, read, min_elements: int = 256) -> dict:
    """Weight-only int8 storage for a float32 graph: every float32 weight of at least min_elements values that
    only feeds MatMul (input B, [K, N]: per column), Gemm (input B: per output row or column, by transB) or Conv
    (input W, [O, I, ...]: per output channel) becomes int8 with one float32 scale per output channel, and a
    DequantizeLinear (opset 13, per axis) gives the float32 weight back in the graph: a quarter of the bytes,
    float32 arithmetic. Other initializers are left alone (store_weights_fp16 can take them after this).
    Returns counts and the names of the scale tensors."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    count, saved, scales = 0, 0, []
    new_nodes = []
    for t in list(model.graph.initializer):
        if t.data_type != TensorProto.FLOAT or t.name not in consumers:
            continue
        axes = set()
        for n, i in consumers[t.name]:
            if n.op_type == "MatMul" and i == 1 and len(t.dims) == 2:
                axes.add(1)
            elif n.op_type == "Gemm" and i == 1 and len(t.dims) == 2:
                trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
                axes.add(0 if trans_b else 1)
            elif n.op_type == "Conv" and i == 1 and len(t.dims) >= 3:
                axes.add(0)
            else:
                axes.add(None)
        if len(axes) != 1 or None in axes:
            continue
        a = read(t)
        if a.size < min_elements:
            continue
        axis = axes.pop()
        q, scale = quantize_int8(a, axis)
        name = t.name
        model.graph.initializer.remove(t)
        model.graph.initializer.extend([numpy_helper.from_array(q, name + ".int8"),
                                        numpy_helper.from_array(scale, name + ".scale")])
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [name + ".int8", name + ".scale"], [name],
                                               axis=axis, name=name + ".dequantize"))
        scales.append(name + ".scale")
        count += 1
        saved += a.size * 3 - scale.size * 4
    for n in reversed(new_nodes):
        model.graph.node.insert(0, n)
    if count and not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
        raise ValueError("int8 weights need opset >= 13 (DequantizeLinear per axis)")
    return dict(weights_int8=count, bytes_saved=saved, scales=scales)


def store_weights_fp16(model: onnx.ModelProto, read, min_elements: int = 256, min_ndim: int = 1) -> dict:
    """Weight-only float16 storage for a float32 graph: every float32 initializer with at least min_elements
    values is stored as float16 and cast back to float32 in the graph, so the file is half as big while the
    arithmetic stays float32 (ONNX Runtime folds these casts into float32 constants when it loads the graph).
    The weights become their float16 roundings; values beyond float16's range are refused."""
    count, saved = 0, 0
    new_nodes = []
    for t in list(model.graph.initializer):
        if t.data_type != TensorProto.FLOAT or len(t.dims) < min_ndim:
            continue
        a = read(t)
        if a.size < min_elements:
            continue
        if np.abs(a).max(initial=0.0) > 65504.0:
            raise ValueError(f"initializer {t.name} exceeds float16's range; cannot store it as float16")
        name = t.name
        model.graph.initializer.remove(t)
        model.graph.initializer.append(numpy_helper.from_array(a.astype(np.float16), name + ".fp16"))
        new_nodes.append(onnx.helper.make_node("Cast", [name + ".fp16"], [name], to=TensorProto.FLOAT,
                                               name=name + ".cast_fp32"))
        count += 1
        saved += a.size * 2
    for n in reversed(new_nodes):
        model.graph.node.insert(0, n)
    return dict(weights_fp16=count, bytes_saved=saved)


def set_metadata(model: onnx.ModelProto, key: str, value: str):
    """model.metadata_props[key] = value (ONNX Runtime: ModelMetadata custom_metadata_map)."""
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def export_spec_model_type(component: str) -> str:
    return {"text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5", "transformer": "mmdit",
            "controlnet": "mmdit", "vae_decoder": "vae", "vae_encoder": "vae"}[component]


def write_component_config(component: str, module, out_dir: Path):
    d = out_dir / component
    d.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers models
        module.save_config(d)
    else:  # transformers
        module.config.save_pretrained(d)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def copy_tokenizers(src: Path, out: Path, components: list[str]):
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if sub == "tokenizer_3" and "text_encoder_3" not in components and not (out / "text_encoder_3").exists():
            continue
        s = src / sub
        if s.is_dir():
            shutil.rmtree(out / sub, ignore_errors=True)
            shutil.copytree(s, out / sub)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="diffusers SD3/SD3.5 folder (model_index.json, transformer/, vae/, ...)")
    src.add_argument("--random", choices=sorted(RANDOM_VARIANTS), help="random weights with the real configs of a variant")
    ap.add_argument("--tokenizers-from", type=Path,
                    help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ (required with --random; default: --model)")
    ap.add_argument("--out", type=Path, required=True, help="output model folder")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--attention", choices=["fused", "plain"], default="fused")
    ap.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    ap.add_argument("--opset", type=int, default=None,
                    help="default: 16 (torchscript fused), 17 (torchscript plain), 23 (dynamo fused), 18 (dynamo plain)")
    ap.add_argument("--components", default=",".join(ALL_COMPONENTS),
                    help="comma-separated subset of: " + ",".join(ALL_COMPONENTS) + f" (default: all), or "
                         f"{SKIP_COMPONENT}: only transformer/{SKIP_FILE} (needs --skip-layers), e.g. into a folder "
                         "exported before from the same weights")
    ap.add_argument("--controlnet-graph", action="store_true",
                    help="with the transformer: also export transformer/" + CONTROLNET_FILE + ", the transformer "
                         "taking ControlNet residuals (docs/controlnet.md); with --fused-kernels rewritten like "
                         "model.onnx, the residuals added between the fused blocks")
    ap.add_argument("--skip-layers", default=None, metavar="I,J,...",
                    help="skip-layer guidance (SD3.5-medium: 7,8,9): also export transformer/" + SKIP_FILE + ", the "
                         "transformer with these MMDiT blocks (0-based) skipped, as diffusers' "
                         "transformer(..., skip_layers=[...]); same inputs/outputs as transformer/model.onnx, the "
                         "list in its ONNX metadata key 'skip_layers'")
    ap.add_argument("--t5-precision", choices=["mixed", "fp32", "fp16"], default="mixed",
                    help="with --dtype fp16/bf16: mixed = fp32 FFN output, residual and RMSNorm (default); fp32 = "
                         "whole T5 in float32; fp16 = naive conversion (overflows with real T5-XXL weights)")
    ap.add_argument("--groupnorm", choices=("onnx", "instancenorm"), default="onnx",
                    help="dynamo exports: keep ONNX's GroupNormalization in the VAE (default; ONNX Runtime inlines "
                         "it as ~25 primitive nodes, the fastest decoder measured on an H200) or rewrite it as "
                         "InstanceNormalization (instancenorm: at opset 23 ONNX Runtime 1.31.1's CUDA provider "
                         "runs those on the CPU, 55x slower; kept for experiments)")
    ap.add_argument("--fp32-components", default="",
                    help="comma-separated components kept in float32 whatever --dtype says (e.g. vae_decoder)")
    ap.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                    help="auto: model.onnx.data for graphs over ~1.8 GB")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (--random)")
    ap.add_argument("--keep-token-ids", type=Path, default=None,
                    help="json list of CLIP token ids: text_encoder and text_encoder_2 keep only these rows of their "
                         "token-embedding table, every other id maps to one shared row (for models trained on a "
                         "small caption vocabulary, e.g. models/nano; exact for prompts made of kept tokens)")
    ap.add_argument("--weights-fp16", action="store_true",
                    help="with --dtype fp32 (or --fp32-components): store weights as float16 and cast them to "
                         "float32 in the graph (half the file size, float32 arithmetic)")
    ap.add_argument("--keep-t5-token-ids", type=Path, default=None,
                    help="json list of T5 token ids: text_encoder_3 keeps only these rows of its embedding table "
                         "(as --keep-token-ids does for the CLIPs)")
    ap.add_argument("--weights-int8", action="store_true",
                    help="with --dtype fp32 (or --fp32-components): store MatMul/Gemm/Conv weights as int8 with a "
                         "float32 scale per output channel (DequantizeLinear in the graph) and the other weights as "
                         "float16 (about a quarter of the file size, float32 arithmetic; for models/nano)")
    ap.add_argument("--fused-kernels", action="store_true",
                    help="with --dtype fp16: rewrite the transformer to the crate's fused operators (domain sd3onnx: "
                         "cuBLASLt bias/GELU epilogues, one gate+residual+adaLN-LayerNorm kernel, no attention "
                         "transposes; models/export/fused_kernels.py). For the CUDA provider; the CPU runs them "
                         "too. Not applied to the --skip-layers graph; SD3.5-medium's dual-attention blocks included")
    ap.add_argument("--torchscript-shape-inference", choices=["on", "off"], default="on",
                    help="off: skip the TorchScript exporter's own ONNX shape inference, which copies every weight "
                         "(over half of the export's time for big models; the output files were the same without it "
                         "on SD3.5-large's transformer at 2 blocks)")
    ap.add_argument("--layers", type=int, default=None,
                    help="--random only: number of MMDiT blocks (real widths, fewer blocks; for quick checks)")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="--random only: number of layers of CLIP-L, CLIP-G and T5 (real widths, so the transformer "
                         "gets the real context shape; for transformer benchmarks, where encoder depth is irrelevant)")
    return ap.parse_args(argv)


def _io_signature(path: Path) -> list:
    m = onnx.load(str(path), load_external_data=False)
    sig = signature(m)
    return sig["inputs"] + sig["outputs"]


def _remove_graph(path: Path):
    for f in (path, path.with_name(path.name + ".data")):
        if f.exists():
            f.unlink()


def main(argv=None):
    args = parse_args(argv)
    global TORCHSCRIPT_SHAPE_INFERENCE
    TORCHSCRIPT_SHAPE_INFERENCE = args.torchscript_shape_inference == "on"
    components = [c for c in args.components.split(",") if c]
    for c in components:
        if c not in ALL_COMPONENTS + [SKIP_COMPONENT]:
            raise SystemExit(f"unknown component {c}; choose from {ALL_COMPONENTS + [SKIP_COMPONENT]}")
    fp32_components = {c for c in args.fp32_components.split(",") if c}
    keep_ids = json.loads(args.keep_token_ids.read_text()) if args.keep_token_ids else None
    keep_t5_ids = json.loads(args.keep_t5_token_ids.read_text()) if args.keep_t5_token_ids else None
    if (args.layers or args.text_layers) and not args.random:
        raise SystemExit("--layers and --text-layers are for --random only")
    source = Source(args.model, args.random, args.tokenizers_from, args.seed, args.layers, args.text_layers)
    skip_layers = None
    if args.skip_layers is not None:
        try:
            skip_layers = validate_skip_layers(parse_skip_layers(args.skip_layers), source.transformer_num_layers())
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if "transformer" not in components and SKIP_COMPONENT not in components:
            raise SystemExit(f"error: --skip-layers needs transformer or {SKIP_COMPONENT} in --components")
    elif SKIP_COMPONENT in components:
        raise SystemExit(f"error: --components {SKIP_COMPONENT} needs --skip-layers (e.g. --skip-layers 7,8,9)")
    out: Path = args.out.resolve()  # graphs are written from inside a temporary working directory
    out.mkdir(parents=True, exist_ok=True)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    warnings.filterwarnings("ignore")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"components": {}}
    skip_path = out / "transformer" / SKIP_FILE
    if "transformer" in components and skip_layers is None and skip_path.exists():
        # It was exported from the previous transformer (maybe other weights or dtype): it would not match.
        log(f"[transformer] removing {skip_path} (from an earlier export; pass --skip-layers to export it again)")
        _remove_graph(skip_path)
        manifest["components"].pop(SKIP_COMPONENT, None)
    cn_path = out / "transformer" / CONTROLNET_FILE
    if "transformer" in components and not args.controlnet_graph and cn_path.exists():
        log(f"[transformer] removing {cn_path} (from an earlier export; pass --controlnet-graph to export it again)")
        _remove_graph(cn_path)
        manifest["components"].pop(CONTROLNET_COMPONENT, None)
    if args.controlnet_graph and "transformer" not in components:
        raise SystemExit("error: --controlnet-graph needs transformer in --components")
    if SKIP_COMPONENT in components and "transformer" not in components:
        if manifest.get("source") not in (None, source.describe()):
            log(f"[{SKIP_COMPONENT}] warning: {out} was exported from {manifest['source']}, the skip graph comes "
                f"from {source.describe()}: they must be the same weights")
    for component in components:
        if component == SKIP_COMPONENT and "transformer" in components:
            continue  # exported with the transformer (one load of its weights)
        graphs = [component]
        if component == "transformer" and skip_layers is not None:
            graphs = [SKIP_COMPONENT, "transformer"]  # the skip graph first: the main export frees the weights
        if component == "transformer" and args.controlnet_graph:
            graphs = [CONTROLNET_COMPONENT] + graphs
        kind = "transformer" if component == SKIP_COMPONENT else component
        log(f"[{component}] loading")
        t_load = time.time()
        module = source.load(kind)
        _phase(component, "built", t_load)
        fp32 = kind in fp32_components or (kind == "transformer" and SKIP_COMPONENT in fp32_components)
        dtype = "fp32" if fp32 else args.dtype
        if component != SKIP_COMPONENT or not (out / "transformer" / "config.json").is_file():
            write_component_config(kind, module, out)
        for i, graph in enumerate(graphs):
            skip = skip_layers if graph == SKIP_COMPONENT else None
            log(f"[{graph}] exporting ({args.exporter}, attention {args.attention}, {dtype}"
                + (f", skip_layers {skip}" if skip else "") + ")")
            info = export_component(kind, module, out, exporter=args.exporter, attention=args.attention,
                                    dtype=dtype, opset=args.opset, t5_precision=args.t5_precision, external=external,
                                    release_torch=i == len(graphs) - 1, skip_layers=skip,
                                    keep_token_ids=keep_ids, weights_fp16=args.weights_fp16,
                                    weights_int8=args.weights_int8, keep_t5_token_ids=keep_t5_ids,
                                    fused_kernels=args.fused_kernels,
                                    controlnet_graph=graph == CONTROLNET_COMPONENT, groupnorm=args.groupnorm)
            manifest["components"][graph] = info
            log(f"[{graph}] {info['node_count']} nodes, {info['seconds']} s: {info['nodes_final']}")
        del module
        gc.collect()
    main_path = out / "transformer" / "model.onnx"
    if SKIP_COMPONENT in components and main_path.is_file():
        a, b = _io_signature(main_path), _io_signature(skip_path)
        if a != b:
            _remove_graph(skip_path)
            raise SystemExit(f"error: {skip_path} would not have the inputs/outputs of {main_path} (other --dtype, "
                             f"--fp32-components or model?): {b} vs {a}; removed it")
    sched = out / "scheduler" / "scheduler_config.json"
    sched.parent.mkdir(parents=True, exist_ok=True)
    sched.write_text(json.dumps(source.scheduler_config(), indent=2) + "\n")
    copy_tokenizers(source.tokenizers_from, out, components)
    # The ids each pruned text encoder kept, next to its tokenizer, for sd3-onnx's unknown-word warning
    # (kept_token_ids.py writes the same files for folders exported before this).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kept_token_ids import write_kept_token_ids  # noqa: E402
    for encoder, ids in (("text_encoder", keep_ids), ("text_encoder_2", keep_ids), ("text_encoder_3", keep_t5_ids)):
        pruned = manifest["components"].get(encoder, {}).get("pruned_vocabulary")
        if ids is not None and pruned:
            write_kept_token_ids(out, encoder, ids, pruned["vocab"])
    index = source.model_index()
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    manifest.update(
        tool="models/export/export_sd3.py",
        source=source.describe(),
        options=dict(dtype=args.dtype, attention=args.attention, exporter=args.exporter, opset=args.opset,
                     skip_layers=skip_layers,
                     t5_precision=args.t5_precision, fp32_components=sorted(fp32_components),
                     external_data=args.external_data, weights_fp16=args.weights_fp16,
                     weights_int8=args.weights_int8, fused_kernels=args.fused_kernels, groupnorm=args.groupnorm,
                     keep_token_ids=len(keep_ids) if keep_ids else None,
                     keep_t5_token_ids=len(keep_t5_ids) if keep_t5_ids else None,
                     tokenizers_from=str(args.tokenizers_from) if args.tokenizers_from else None),
        versions=tool_versions(),
    )
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[str(f.relative_to(out))] = dict(size=f.stat().st_size, sha256=sha256_file(f))
    manifest["files"] = files
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out} ({len(files)} files)")


if __name__ == "__main__":
    main()
