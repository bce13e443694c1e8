#!/usr/bin/env python3
"""Regenerates every test fixture and golden output under models/.

This script is the record of where every binary under models/fixtures and models/goldens came from.
Run it from anywhere:

    bash models/setup-python.sh && .venv-tools/bin/python models/make_fixtures.py

or a subset while iterating (stages run in this order, each reads what the earlier ones wrote):

    python models/make_fixtures.py --stages tokenizers,models,goldens,fp16,scheduler,tokjson,broken,readme

Nothing is downloaded: the CLIP BPE vocabulary comes from the open_clip wheel, the T5 sentencepiece model is
trained here on generated text, and every network has random (seeded) weights.

Stages
  tokenizers  CLIP vocab.json/merges.txt from open_clip's bpe_simple_vocab_16e6.txt.gz (the real CLIP BPE) and a
              small sentencepiece unigram model in T5's conventions (pad=0, eos=1, unk=2, 100 extra ids).
  models      two tiny random SD3-architecture diffusers pipelines (tiny-sd3 like SD3-medium, tiny-sd35 like
              SD3.5-medium), saved to the build folder (not committed) and exported with
              `optimum-cli export onnx --task text-to-image` into models/fixtures/<name>/.
  goldens     for each fixture and case: latents.npy, diffusers.png (PyTorch), optimum.png (ONNX Runtime via
              optimum), debug tensors for `cfg_negative`, summary.json, and the sensitivity table (sensitivity.json).
  fp16        models/fixtures/tiny-sd3-fp16/{transformer,vae_decoder} converted to float16 (fp16 inputs/outputs)
              and its golden (goldens/tiny-sd3-fp16/cfg_negative).
  scheduler   models/goldens/scheduler.json (FlowMatchEulerDiscreteScheduler sigmas/timesteps).
  tokjson     models/goldens/tokenizers.json (input ids for a prompt corpus, as diffusers tokenizes them).
  broken      models/fixtures/broken/*.onnx (hand-built invalid graphs for error tests).
  readme      models/fixtures/README.md (signatures, dimensions, tables, sizes: all generated from the files).

Determinism: every random draw is seeded (torch.manual_seed per component, random.Random for text), PyTorch and
ONNX Runtime run single-threaded. See models/fixtures/README.md for what is and is not bit-identical across runs.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Keep the logs readable; the warnings silenced here are tracer/deprecation chatter from the exporters.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    T5TokenizerFast,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

MODELS = Path(__file__).resolve().parent  # <repo>/models
REPO = MODELS.parent
FIXTURES = MODELS / "fixtures"
GOLDENS = MODELS / "goldens"
# Build folder for everything that is NOT committed (diffusers checkpoints, raw optimum exports, tokenizer work).
BUILD = Path(os.environ.get("SD3_FIXTURE_BUILD", os.path.join(tempfile.gettempdir(), "sd3-onnx-fixture-build")))
PYBIN = Path(sys.executable).parent

CLIP_MAX_LENGTH = 77  # model_max_length of both CLIP tokenizers (real SD3 repo)
T5_MAX_LENGTH = 512  # model_max_length of the T5 tokenizer (real SD3 repo)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def log(*a):
    print(*a, flush=True)


def write_json(path: Path, obj, compact=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def f32list(t) -> list[float]:
    """float32 tensor/array -> list of python floats (exact: every f32 is representable as a python float)."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return [float(x) for x in a.astype(np.float32).reshape(-1)]


# ----------------------------------------------------------------------------------------------------------------
# Fixture specifications
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ClipSpec:
    hidden: int
    layers: int
    heads: int
    proj: int  # projection_dim: width of text_embeds (the pooled output)
    act: str  # "quick_gelu" like openai CLIP-L, "gelu" like OpenCLIP bigG


@dataclass
class Spec:
    name: str
    seed: int
    layout: str  # "fast": tokenizer.json only (optimum layout); "real": vocab.json+merges.txt (real SD3 repo)
    clip_l: ClipSpec
    clip_g: ClipSpec
    t5: dict
    transformer: dict
    vae: dict
    scheduler: dict
    # Weight scaling that makes the random networks produce informative images (see informative_init()).
    init: dict = field(default_factory=dict)


SPECS = {
    # SD3-medium-like: no qk-norm, no dual attention. VAE factors and scheduler shift as SD3-medium.
    "tiny-sd3": Spec(
        name="tiny-sd3",
        seed=3,
        layout="fast",
        clip_l=ClipSpec(hidden=8, layers=2, heads=2, proj=8, act="quick_gelu"),
        clip_g=ClipSpec(hidden=12, layers=3, heads=2, proj=12, act="gelu"),
        t5=dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, vocab_size=1152),
        transformer=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, qk_norm=None, dual_attention_layers=()),
        vae=dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=dict(shift=3.0),
        init=dict(clip_embed_std=0.5, t5_embed_std=1.0, t5_qk_gain=4.0, attn_v_gain=6.0, transformer_out_gain=4.0,
                  vae_out_gain=1.5),
    ),
    # SD3.5-medium-like: qk RMS-norm and dual attention (MMDiT-X) in the first blocks. Deliberately different
    # widths, projection dims != hidden dims, other VAE factors and another scheduler shift, so that code that
    # hard-codes anything instead of reading graphs/configs fails on one of the two fixtures.
    "tiny-sd35": Spec(
        name="tiny-sd35",
        seed=35,
        layout="real",
        clip_l=ClipSpec(hidden=10, layers=2, heads=2, proj=6, act="quick_gelu"),
        clip_g=ClipSpec(hidden=14, layers=3, heads=2, proj=16, act="gelu"),
        t5=dict(d_model=40, d_kv=10, num_heads=4, d_ff=80, num_layers=2, vocab_size=1152),
        transformer=dict(num_layers=3, num_attention_heads=3, attention_head_dim=8, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
        vae=dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, scaling_factor=1.25, shift_factor=0.125),
        scheduler=dict(shift=2.5),
        init=dict(clip_embed_std=0.5, t5_embed_std=1.0, t5_qk_gain=3.0, attn_v_gain=8.0, transformer_out_gain=4.0,
                  vae_out_gain=1.5),
    ),
}

TRANSFORMER_SAMPLE_SIZE = 8  # latent side of the default image: 8 * VAE factor 8 = 64 px
POS_EMBED_MAX_SIZE = 16  # latent side up to 16 patches * 2 = 32 latents = 256 px (>= 128 px as required)

# ----------------------------------------------------------------------------------------------------------------
# Stage: tokenizers
# ----------------------------------------------------------------------------------------------------------------

TOK_BUILD = BUILD / "tokenizers"


def open_clip_bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_and_merges():
    """The real CLIP BPE, built exactly as openai/clip-vit-large-patch14's vocab.json/merges.txt.

    open_clip's SimpleTokenizer (and OpenAI's original) build the vocabulary as: 256 byte characters (GPT-2
    bytes_to_unicode order), the same 256 with '</w>', one token per merge (48894 merges: lines 1..48894 of the
    gz file, line 0 being a version header), then <|startoftext|> (49406) and <|endoftext|> (49407).
    """
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    assert vocab.index(BOS) == 49406 and vocab.index(EOS) == 49407 and vocab.index("!") == 0
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_real_configs(pad_token: str):
    """tokenizer_config.json + special_tokens_map.json as in stabilityai/stable-diffusion-3-medium-diffusers.

    tokenizer/ (CLIP-L) pads with <|endoftext|>; tokenizer_2/ (OpenCLIP bigG) pads with "!" (id 0), which is then
    also an added *special* token: a "!" typed in the prompt is split out and becomes id 0 for CLIP-G.
    """
    added = {}
    if pad_token == "!":
        added["0"] = dict(content="!", lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    added["49406"] = dict(content=BOS, lstrip=False, normalized=True, rstrip=False, single_word=False, special=True)
    added["49407"] = dict(content=EOS, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    tok = lambda c, n: dict(content=c, lstrip=False, normalized=n, rstrip=False, single_word=False)  # noqa: E731
    special = {"bos_token": tok(BOS, True), "eos_token": tok(EOS, False), "pad_token": pad_token, "unk_token": tok(EOS, False)}
    return config, special


# --- T5: a sentencepiece unigram model trained on generated English prompts --------------------------------------

_ADJ = (
    "red green blue yellow purple orange black white golden silver tiny huge small large ancient modern futuristic "
    "cozy dark bright misty foggy sunny rainy snowy shiny rusty wooden metallic glass crystal fluffy soft sharp "
    "blurry detailed vibrant pastel neon gloomy cheerful quiet busy empty crowded beautiful ugly strange magical "
    "mysterious peaceful wild calm stormy frozen burning floating hidden broken smooth rough elegant simple colorful "
    "faded glowing"
).split()
_NOUN = (
    "cat dog horse astronaut robot castle mountain river forest city street house tree flower garden ocean beach "
    "island boat ship car train bicycle bird dragon knight wizard princess king queen child woman man girl boy "
    "portrait landscape painting photograph sculpture window door bridge tower lighthouse moon sun star planet "
    "galaxy cloud sky field village market kitchen table chair lamp book clock mirror cup teapot apple banana lemon "
    "cake bread cheese coffee tea owl fox wolf bear rabbit tiger lion elephant whale fish butterfly bee spider "
    "snake frog turtle penguin"
).split()
_VERB = (
    "sitting standing running flying walking sleeping reading painting eating drinking dancing singing jumping "
    "swimming riding holding watching looking climbing falling waiting playing"
).split()
_PREP = "on in under near behind above beside inside through across over at".split()
_STYLE = [
    "oil painting", "watercolor", "digital art", "pencil sketch", "studio photo", "cinematic lighting",
    "high resolution", "highly detailed", "trending on artstation", "octane render", "unreal engine", "35mm film",
    "bokeh", "wide angle", "macro shot", "isometric view", "pixel art", "concept art", "by a famous artist",
    "in the style of van gogh", "soft light", "golden hour", "dramatic shadows", "4k", "8k uhd",
]
_EXTRA = "café naïve über façade résumé jalapeño piñata crème brûlée déjà vu el niño São Paulo Zürich Ångström".split()
_NUM = ["one", "two", "three", "four", "five", "ten", "twenty", "100", "2024", "3.5", "42", "1st", "2nd"]


def t5_training_text(n=20000, seed=1234) -> list[str]:
    """Deterministic English-like training text: half templated image prompts, half word salad made of the 3000
    most frequent whole words of the CLIP BPE vocabulary (so the unigram model learns real English pieces)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")[1:48895]
    words = ("".join(m.split())[:-4] for m in lines if m.endswith("</w>"))
    common = [w for w in words if re.fullmatch(r"[a-z]{3,}", w)][:3000]
    r = random.Random(seed)

    def sentence():
        if r.random() < 0.5:
            return " ".join(r.choice(common) for _ in range(r.randint(3, 12))) + r.choice([".", "", "!"])
        parts = []
        if r.random() < 0.5:
            parts.append(r.choice(["a", "an", "the", "a photo of a", "a painting of the", "an image of a",
                                   "a close-up of a", "a portrait of a"]))
        if r.random() < 0.3:
            parts.append(r.choice(_NUM))
        parts += [r.choice(_ADJ) for _ in range(r.randint(0, 3))]
        parts.append(r.choice(_NOUN))
        if r.random() < 0.7:
            parts += [r.choice(_VERB), r.choice(_PREP), r.choice(["a", "the"]), r.choice(_ADJ), r.choice(_NOUN)]
        if r.random() < 0.2:
            parts.append(r.choice(_EXTRA))
        s = " ".join(parts)
        if r.random() < 0.6:
            s += ", " + ", ".join(r.sample(_STYLE, r.randint(1, 3)))
        if r.random() < 0.3:
            s = s[0].upper() + s[1:]
        return s + r.choice(["", ".", "!", "?", "..."])

    return [sentence() for _ in range(n)]


def train_t5_spiece(path: Path):
    """Unigram sentencepiece model with T5's conventions: <pad>=0, </s>=1, <unk>=2, no <s>, nmt_nfkc normalization,
    dummy prefix, whitespace collapsing (all as in google/t5-v1_1-xxl's spiece.model), 1000 pieces."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_text()),
        model_writer=model,
        model_type="unigram",
        vocab_size=1000,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        byte_fallback=False,
        split_digits=False,
        num_threads=1,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())


def stage_tokenizers():
    """Builds the tokenizer folders in the build dir; the fixture stages copy them in their layout.

    TOK_BUILD/clip_l_real, clip_g_real: vocab.json + merges.txt + real-repo configs (the tiny-sd35 layout)
    TOK_BUILD/clip_l_fast, clip_g_fast: CLIPTokenizerFast converted from the above, saved (tokenizer.json, ...)
    TOK_BUILD/t5: spiece.model + tokenizer.json (T5TokenizerFast with 100 extra ids) + configs
    """
    shutil.rmtree(TOK_BUILD, ignore_errors=True)
    vocab, merges = clip_vocab_and_merges()
    for which, pad in (("l", EOS), ("g", "!")):
        real = TOK_BUILD / f"clip_{which}_real"
        real.mkdir(parents=True)
        # Same formatting as openai/clip-vit-large-patch14: one-line vocab.json, "#version: 0.2" header in merges.
        with open(real / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
        with open(real / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        config, special = clip_real_configs(pad)
        write_json(real / "tokenizer_config.json", config)
        write_json(real / "special_tokens_map.json", special)
        slow = CLIPTokenizer.from_pretrained(real)
        assert len(slow) == 49408 and slow.pad_token_id == (49407 if pad == EOS else 0)
        fast = CLIPTokenizerFast.from_pretrained(real)  # converted from the slow files, as transformers does
        fast_dir = TOK_BUILD / f"clip_{which}_fast"
        fast.save_pretrained(fast_dir)
        for f in ("vocab.json", "merges.txt"):  # the fast layout ships tokenizer.json only
            (fast_dir / f).unlink()
        compact_json_file(fast_dir / "tokenizer.json")
        check = CLIPTokenizerFast.from_pretrained(fast_dir)
        probe = "a photo of a cat!!! <|endoftext|> 日本"
        assert check(probe).input_ids == fast(probe).input_ids
        log(f"  clip-{which}: pad {pad!r} -> {slow.pad_token_id}; {probe!r} -> {check(probe).input_ids}")

    t5 = TOK_BUILD / "t5"
    train_t5_spiece(t5 / "spiece.model")
    # add_prefix_space=True: convert with Metaspace(prepend_scheme="always") like google/t5-v1_1-xxl's
    # tokenizer.json (transformers 4.57 would otherwise convert a fresh spiece.model with prepend_scheme="never").
    tok3 = T5TokenizerFast(vocab_file=str(t5 / "spiece.model"), model_max_length=T5_MAX_LENGTH, add_prefix_space=True)
    tok3.save_pretrained(t5)
    compact_json_file(t5 / "tokenizer.json")
    # Drop add_prefix_space from the saved config: with it, T5TokenizerFast.from_pretrained would re-convert from
    # spiece.model on every load (and fail where only tokenizer.json ships). The real SD3 config has no such key.
    cfg = read_json(t5 / "tokenizer_config.json")
    cfg.pop("add_prefix_space", None)
    write_json(t5 / "tokenizer_config.json", cfg)
    tok3 = T5TokenizerFast.from_pretrained(t5)
    slow3 = T5Tokenizer(vocab_file=str(t5 / "spiece.model"), extra_ids=100)
    for s in ["A photo of a cat", "  two  spaces ", "Zürich café"]:
        assert tok3(s).input_ids == slow3(s).input_ids, s
    assert tok3.pad_token_id == 0 and tok3.eos_token_id == 1 and tok3.unk_token_id == 2 and len(tok3) == 1100
    log(f"  t5: {len(tok3)} tokens; 'A photo of a cat' -> {tok3('A photo of a cat').input_ids}")


def compact_json_file(path: Path):
    """Re-write a JSON file without indentation (same content, ~half the size for tokenizer.json)."""
    write_json(path, read_json(path), compact=True)


# ----------------------------------------------------------------------------------------------------------------
# Stage: models (diffusers pipelines -> optimum-cli ONNX export -> committed fixture folders)
# ----------------------------------------------------------------------------------------------------------------


def diffusers_dir(name: str) -> Path:
    return BUILD / f"{name}-diffusers"


def build_pipeline(spec: Spec) -> StableDiffusion3Pipeline:
    """A random-weight StableDiffusion3Pipeline with the spec's dimensions. Each component is created right after
    its own torch.manual_seed, so changing one component's shape leaves the others' weights unchanged."""

    def seeded(k):
        torch.manual_seed(spec.seed * 100 + k)

    def clip(c: ClipSpec, k):
        seeded(k)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=c.hidden,
                intermediate_size=4 * c.hidden,
                num_hidden_layers=c.layers,
                num_attention_heads=c.heads,
                max_position_embeddings=CLIP_MAX_LENGTH,
                projection_dim=c.proj,
                hidden_act=c.act,
                layer_norm_eps=1e-5,
                # eos_token_id=49407: pooling takes the first <|endoftext|> (the real SD3 configs say 2, the
                # legacy value for which transformers pools at argmax(input_ids) - the same position here).
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=1,
            )
        ).eval()

    text_encoder = clip(spec.clip_l, 1)
    text_encoder_2 = clip(spec.clip_g, 2)
    seeded(3)
    t = spec.t5
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=t["vocab_size"],  # > 1100 tokenizer ids, padded like T5's 32128 > 32100
            d_model=t["d_model"],
            d_kv=t["d_kv"],
            d_ff=t["d_ff"],
            num_layers=t["num_layers"],
            num_heads=t["num_heads"],
            feed_forward_proj="gated-gelu",  # T5 v1.1 (t5-v1_1-xxl) style
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    seeded(4)
    tr = spec.transformer
    pooled_dim = spec.clip_l.proj + spec.clip_g.proj
    inner = tr["num_attention_heads"] * tr["attention_head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=TRANSFORMER_SAMPLE_SIZE,
        patch_size=2,
        in_channels=16,
        num_layers=tr["num_layers"],
        attention_head_dim=tr["attention_head_dim"],
        num_attention_heads=tr["num_attention_heads"],
        joint_attention_dim=t["d_model"],
        caption_projection_dim=inner,
        pooled_projection_dim=pooled_dim,
        out_channels=16,
        pos_embed_max_size=POS_EMBED_MAX_SIZE,
        dual_attention_layers=tuple(tr["dual_attention_layers"]),
        qk_norm=tr["qk_norm"],
    ).eval()
    seeded(5)
    v = spec.vae
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(v["block_out_channels"]),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=v["norm_num_groups"],
        sample_size=64,
        scaling_factor=v["scaling_factor"],
        shift_factor=v["shift_factor"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.scheduler["shift"])
    informative_init(spec, text_encoder, text_encoder_2, text_encoder_3, transformer, vae)

    toks = load_layout_tokenizers(spec.layout)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=toks[0],
        text_encoder_2=text_encoder_2,
        tokenizer_2=toks[1],
        text_encoder_3=text_encoder_3,
        tokenizer_3=toks[2],
    )


@torch.no_grad()
def informative_init(spec: Spec, te1, te2, te3, transformer, vae):
    """Random networks at their default init give images that hardly depend on the prompt: CLIP's embeddings are
    N(0, 0.02) and vanish in the joint attention, T5 attends almost uniformly (so its padding and </s> hardly
    matter), the transformer's velocity is small next to the noise and the VAE decoder output is flat. The gains
    below (applied after seeded init, so deterministic) make every input matter visibly while keeping the images
    unsaturated; the `goldens` stage verifies that (sensitivity table) and reports pixel statistics of each golden.

    clip_embed_std       token and position embeddings of both CLIPs ~ N(0, std)   (default 0.02)
    t5_embed_std         T5 token embeddings ~ N(0, std)                           (default 1.0)
    t5_qk_gain           T5 self-attention q and k weights * gain: sharper attention, so </s> and pads matter
    attn_v_gain          transformer joint-attention value projections (image and context) * gain
    transformer_out_gain transformer proj_out weights * gain (velocity magnitude)
    vae_out_gain         VAE decoder conv_out weights * gain (pixel contrast; too much saturates at 0/255)
    """
    g = spec.init
    for te in (te1, te2):
        emb = te.text_model.embeddings
        emb.token_embedding.weight.normal_(0.0, g["clip_embed_std"])
        emb.position_embedding.weight.normal_(0.0, g["clip_embed_std"])
    te3.shared.weight.normal_(0.0, g["t5_embed_std"])
    for block in te3.encoder.block:
        block.layer[0].SelfAttention.q.weight.mul_(g["t5_qk_gain"])
        block.layer[0].SelfAttention.k.weight.mul_(g["t5_qk_gain"])
    for block in transformer.transformer_blocks:
        block.attn.to_v.weight.mul_(g["attn_v_gain"])
        block.attn.add_v_proj.weight.mul_(g["attn_v_gain"])
    transformer.proj_out.weight.mul_(g["transformer_out_gain"])
    vae.decoder.conv_out.weight.mul_(g["vae_out_gain"])


def load_layout_tokenizers(layout: str):
    """The three tokenizers exactly as diffusers loads them from a fixture folder of the given layout."""
    t5 = T5TokenizerFast.from_pretrained(TOK_BUILD / "t5")
    if layout == "fast":
        return CLIPTokenizerFast.from_pretrained(TOK_BUILD / "clip_l_fast"), CLIPTokenizerFast.from_pretrained(TOK_BUILD / "clip_g_fast"), t5
    return CLIPTokenizer.from_pretrained(TOK_BUILD / "clip_l_real"), CLIPTokenizer.from_pretrained(TOK_BUILD / "clip_g_real"), t5


def optimum_export(src: Path, out: Path):
    """`optimum-cli export onnx --model <src> --task text-to-image <out>` (fp32, default opset), run with cwd=BUILD
    and relative paths so that the `_name_or_path` written into the configs does not depend on the build folder."""
    shutil.rmtree(out, ignore_errors=True)
    cli = PYBIN / "optimum-cli"
    cmd = [str(cli), "export", "onnx", "--model", src.name, "--task", "text-to-image", out.name]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=src.parent, env=env, capture_output=True, text=True)
    (BUILD / f"{out.name}.export.log").write_text(res.stdout + "\n" + res.stderr)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-5000:])
        raise SystemExit(f"optimum-cli export failed for {src}")


def install_fixture(spec: Spec, exported: Path):
    """Copies optimum's export into models/fixtures/<name>/ and lays out the tokenizers:
    - tiny-sd3 ("fast"): tokenizer*/tokenizer.json + tokenizer_config.json + special_tokens_map.json; no
      vocab.json/merges.txt (model_index.json says CLIPTokenizerFast) and no spiece.model.
    - tiny-sd35 ("real", the stabilityai SD3 repo layout): tokenizer/ and tokenizer_2/ hold vocab.json +
      merges.txt + configs only (CLIPTokenizer, slow), tokenizer_3/ holds spiece.model + tokenizer.json + configs.
    """
    dst = FIXTURES / spec.name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for item in ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                 "vae_decoder", "vae_encoder"):
        s = exported / item
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, dst / item)
    index = read_json(dst / "model_index.json")
    index["_name_or_path"] = spec.name
    if spec.layout == "fast":
        for sub, src in (("tokenizer", "clip_l_fast"), ("tokenizer_2", "clip_g_fast")):
            shutil.copytree(TOK_BUILD / src, dst / sub)
        shutil.copytree(TOK_BUILD / "t5", dst / "tokenizer_3", ignore=shutil.ignore_patterns("spiece.model"))
        index["tokenizer"] = index["tokenizer_2"] = ["transformers", "CLIPTokenizerFast"]
    else:
        for sub, src in (("tokenizer", "clip_l_real"), ("tokenizer_2", "clip_g_real")):
            shutil.copytree(TOK_BUILD / src, dst / sub)
        shutil.copytree(TOK_BUILD / "t5", dst / "tokenizer_3")
        index["tokenizer"] = index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    write_json(dst / "model_index.json", index)
    # Per-component configs as optimum wrote them, except the build-folder dependent `_name_or_path`.
    for cfg in dst.glob("*/config.json"):
        c = read_json(cfg)
        if "_name_or_path" in c:
            c["_name_or_path"] = f"{spec.name}/{cfg.parent.name}"
            write_json(cfg, c)


def load_ort_pipeline(folder: Path):
    from optimum.onnxruntime import ORTStableDiffusion3Pipeline

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ORTStableDiffusion3Pipeline.from_pretrained(folder, session_options=so)


def stage_models(names):
    for name in names:
        spec = SPECS[name]
        log(f"[models] {name}")
        pipe = build_pipeline(spec)
        src = diffusers_dir(name)
        shutil.rmtree(src, ignore_errors=True)
        pipe.save_pretrained(src)
        exported = BUILD / f"{name}-onnx"
        optimum_export(src, exported)
        install_fixture(spec, exported)
        # The committed folder must load as committed with optimum's ORT pipeline.
        ort_pipe = load_ort_pipeline(FIXTURES / name)
        log(f"  loaded {type(ort_pipe).__name__}: tokenizers {type(ort_pipe.tokenizer).__name__}, "
            f"{type(ort_pipe.tokenizer_2).__name__}, {type(ort_pipe.tokenizer_3).__name__}")


def load_diffusers_pipeline(name: str) -> StableDiffusion3Pipeline:
    """The PyTorch reference: weights from the (uncommitted) diffusers checkpoint, tokenizers loaded from the
    committed fixture folder with the classes its model_index.json names (as diffusers would)."""
    fixture = FIXTURES / name
    index = read_json(fixture / "model_index.json")
    import transformers

    toks = {}
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        cls = getattr(transformers, index[sub][1])
        toks[sub] = cls.from_pretrained(fixture / sub)
    pipe = StableDiffusion3Pipeline.from_pretrained(diffusers_dir(name), torch_dtype=torch.float32, **toks)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Stage: goldens
# ----------------------------------------------------------------------------------------------------------------

LONG_PROMPT = (
    "A breathtaking, highly detailed oil painting of an ancient stone lighthouse standing on a rocky island in the "
    "middle of a stormy ocean at dusk, enormous waves crashing against the cliffs, seagulls circling above the "
    "glowing lantern, dark purple clouds lit from below by the last orange light of the setting sun, a small "
    "wooden fishing boat with a red sail struggling through the foam in the foreground, rain streaks, spray, mist, "
    "dramatic contrast, cinematic composition, in the style of the old romantic masters, trending on artstation, "
    "8k resolution, sharp focus, volumetric lighting, intricate textures on the wet rocks and the weathered bricks"
)


@dataclass
class Case:
    name: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int
    latent_seed: int


CASES = [
    Case("cfg_negative", "a photo of a red cat sitting on a wooden table", "blurry, low quality", 64, 64, 4, 5.0, 256, 1),
    Case("long_prompt", LONG_PROMPT, "", 64, 64, 3, 4.0, 32, 2),
    Case("guidance_1", "an astronaut riding a horse on the moon", "", 64, 64, 5, 1.0, 256, 3),
    Case("non_square", "a castle on a hill under a starry sky", "ugly", 96, 64, 4, 3.5, 256, 4),
]


def initial_latents(case: Case, channels=16, factor=8) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(case.latent_seed)
    return torch.randn((1, channels, case.height // factor, case.width // factor), generator=g, dtype=torch.float32)


def pipe_kwargs(case: Case, latents):
    return dict(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt or None,
        width=case.width,
        height=case.height,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        max_sequence_length=case.max_sequence_length,
        latents=latents.clone(),
    )


def to_uint8(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def pixel_stats(a: np.ndarray) -> dict:
    a = a.astype(np.float64)
    return dict(min=int(a.min()), max=int(a.max()), mean=round(a.mean(), 2), std=round(a.std(), 2),
                frac_0=round(float((a == 0).mean()), 4), frac_255=round(float((a == 255).mean()), 4))


def diff_stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return dict(max_abs=int(d.max()), mean_abs=round(float(d.mean()), 5), pixels_differing=int((d > 0).sum()))


def request_json(case: Case) -> dict:
    return dict(prompt=case.prompt, negative_prompt=case.negative_prompt, width=case.width, height=case.height,
                steps=case.steps, guidance=case.guidance, max_sequence_length=case.max_sequence_length)


@torch.no_grad()
def stage_goldens(names):
    for name in names:
        log(f"[goldens] {name}")
        pipe = load_diffusers_pipeline(name)
        opipe = load_ort_pipeline(FIXTURES / name)
        opipe.set_progress_bar_config(disable=True)
        gdir = GOLDENS / name
        shutil.rmtree(gdir, ignore_errors=True)
        summary = {"fixture": f"models/fixtures/{name}", "cases": {}}
        for case in CASES:
            out = gdir / case.name
            out.mkdir(parents=True)
            latents = initial_latents(case)
            np.save(out / "latents.npy", latents.numpy())
            req = request_json(case)
            req["latents"] = "latents.npy"
            req["latent_seed"] = case.latent_seed
            write_json(out / "request.json", req)
            img_d = pipe(**pipe_kwargs(case, latents), output_type="pil").images[0]
            img_d.save(out / "diffusers.png")
            img_o = opipe(**pipe_kwargs(case, latents), output_type="pil").images[0]
            img_o.save(out / "optimum.png")
            a, b = to_uint8(img_d), to_uint8(img_o)
            summary["cases"][case.name] = dict(diffusers_vs_optimum=diff_stats(a, b), diffusers_pixels=pixel_stats(a),
                                               optimum_pixels=pixel_stats(b))
            log(f"  {case.name:13s} diffusers vs optimum {diff_stats(a, b)}  pixels {pixel_stats(a)}")
            if case.name == "cfg_negative":
                save_debug_tensors(pipe, case, latents, out)
        summary["sensitivity"] = sensitivity_table(pipe)
        write_json(gdir / "summary.json", summary)


def save_debug_tensors(pipe, case: Case, latents, out: Path):
    """What diffusers' encode_prompt returns, the final latents (before VAE scaling) and the schedule."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=case.prompt, prompt_2=None, prompt_3=None, negative_prompt=case.negative_prompt,
        do_classifier_free_guidance=True, max_sequence_length=case.max_sequence_length,
    )
    for fname, t in (("prompt_embeds", pe), ("negative_prompt_embeds", npe), ("pooled_prompt_embeds", ppe),
                     ("negative_pooled_prompt_embeds", nppe)):
        np.save(out / f"{fname}.npy", t.float().numpy())
    final = pipe(**pipe_kwargs(case, latents), output_type="latent").images
    np.save(out / "final_latents.npy", final.float().numpy())
    np.save(out / "sigmas.npy", pipe.scheduler.sigmas.float().numpy())
    np.save(out / "timesteps.npy", pipe.scheduler.timesteps.float().numpy())


# --- sensitivity: would a test with a 1/255 tolerance catch typical mistakes? -------------------------------------


def guidance_diffusers(vu, vc, g):
    return vu + g * (vc - vu)


def guidance_wrong(vu, vc, g):
    return vc + g * (vc - vu)


@torch.no_grad()
def denoise(pipe, pe, ppe, npe, nppe, latents, steps, guidance, combine=guidance_diffusers, shift=None,
            timestep_scale=1.0):
    """The denoising loop of StableDiffusion3Pipeline.__call__ (diffusers 0.35.2, no skip-layer guidance), with
    hooks for the deliberate mistakes. Checked below to reproduce the pipeline's latents bit for bit."""
    cfg = dict(pipe.scheduler.config)
    if shift is not None:
        cfg["shift"] = shift
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    do_cfg = guidance > 1
    ctx = torch.cat([npe, pe]) if do_cfg else pe
    pooled = torch.cat([nppe, ppe]) if do_cfg else ppe
    x = latents.clone()
    for t in sched.timesteps:
        inp = torch.cat([x] * 2) if do_cfg else x
        v = pipe.transformer(hidden_states=inp, timestep=(t * timestep_scale).expand(inp.shape[0]),
                             encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]
        if do_cfg:
            vu, vc = v.chunk(2)
            v = combine(vu, vc, guidance)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def decode(pipe, x, shift_factor=None):
    sf = pipe.vae.config.shift_factor if shift_factor is None else shift_factor
    z = x / pipe.vae.config.scaling_factor + sf
    img = pipe.vae.decode(z, return_dict=False)[0]
    return to_uint8(pipe.image_processor.postprocess(img, output_type="pil")[0])


@torch.no_grad()
def encode(pipe, case: Case, tokenizer_2=None, t5_add_special_tokens=True, max_sequence_length=None,
           clip_layer=None):
    """encode_prompt for prompt and negative prompt, optionally with a mistake injected."""
    saved = pipe.tokenizer_2
    if tokenizer_2 is not None:
        pipe.tokenizer_2 = tokenizer_2
    try:
        clip_skip = None if clip_layer is None else clip_layer
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=case.prompt, prompt_2=None, prompt_3=None, negative_prompt=case.negative_prompt,
            do_classifier_free_guidance=True, clip_skip=clip_skip,
            max_sequence_length=max_sequence_length or case.max_sequence_length,
        )
    finally:
        pipe.tokenizer_2 = saved
    if not t5_add_special_tokens:  # re-do the T5 part without </s> (pad to the same length instead)
        n = max_sequence_length or case.max_sequence_length
        for emb, text in ((pe, case.prompt), (npe, case.negative_prompt)):
            ids = pipe.tokenizer_3(text, padding="max_length", max_length=n, truncation=True,
                                   add_special_tokens=False, return_tensors="pt").input_ids
            emb[:, CLIP_MAX_LENGTH:] = pipe.text_encoder_3(ids)[0]
    return pe, ppe, npe, nppe


def sensitivity_table(pipe) -> list[dict]:
    """Each row: a plausible implementation mistake, and how much it changes the final diffusers image of every
    case (max abs pixel difference, 0..255). A row is 'caught' when some golden changes by more than 3/255, so a
    Rust test comparing all goldens at a 1/255 tolerance fails. Rows (a)..(e) must be caught (else this stage
    fails and the fixture's init gains need adjusting); x1, x2 are informative extras."""
    shift = pipe.scheduler.config.shift
    tok2_wrong = copy.deepcopy(pipe.tokenizer_2)
    tok2_wrong.pad_token = EOS  # CLIP-G padded with <|endoftext|> 49407 like CLIP-L
    assert tok2_wrong.pad_token_id == 49407
    run = lambda c, lat, emb, **kw: decode(pipe, denoise(pipe, *emb, lat, c.steps, c.guidance, **kw))  # noqa: E731
    rows = [
        ("a", "CLIP-G padded with 49407 (<|endoftext|>) instead of 0 (!)",
         lambda c, lat, emb, x: run(c, lat, encode(pipe, c, tokenizer_2=tok2_wrong))),
        ("b", f"scheduler shift {shift} + 0.1",
         lambda c, lat, emb, x: run(c, lat, emb, shift=shift + 0.1)),
        ("b2", f"scheduler shift {shift} - 0.1",
         lambda c, lat, emb, x: run(c, lat, emb, shift=shift - 0.1)),
        ("c", "guidance v_c + g*(v_c - v_u) instead of v_u + g*(v_c - v_u) (n/a without CFG)",
         lambda c, lat, emb, x: run(c, lat, emb, combine=guidance_wrong)),
        ("d1", "T5 padded to max_sequence_length - 1 tokens (one pad fewer)",
         lambda c, lat, emb, x: run(c, lat, encode(pipe, c, max_sequence_length=c.max_sequence_length - 1))),
        ("d2", "T5 without the trailing </s> (padded instead)",
         lambda c, lat, emb, x: run(c, lat, encode(pipe, c, t5_add_special_tokens=False))),
        ("e", "VAE shift_factor ignored (z / scaling_factor only)",
         lambda c, lat, emb, x: decode(pipe, x, shift_factor=0.0)),
        ("x1", "CLIP hidden_states[-1] instead of [-2] for the prompt (clip_skip=-1)",
         lambda c, lat, emb, x: run(c, lat, encode(pipe, c, clip_layer=-1))),
        ("x2", "timestep fed as sigma (0..1) instead of sigma*1000",
         lambda c, lat, emb, x: run(c, lat, emb, timestep_scale=1e-3)),
    ]
    refs = {}
    for case in CASES:
        latents = initial_latents(case)
        ref_img = to_uint8(pipe(**pipe_kwargs(case, latents), output_type="pil").images[0])
        ref_lat = pipe(**pipe_kwargs(case, latents), output_type="latent").images
        emb = encode(pipe, case)
        x = denoise(pipe, *emb, latents, case.steps, case.guidance)
        assert torch.equal(x, ref_lat), f"reference loop does not reproduce the pipeline's latents ({case.name})"
        assert np.array_equal(decode(pipe, x), ref_img), f"reference decode differs from the pipeline ({case.name})"
        refs[case.name] = (latents, emb, x, ref_img)
    table = []
    log("  sensitivity: max abs pixel diff vs the diffusers golden, per case " + str([c.name for c in CASES]))
    for key, what, fn in rows:
        per_case = {}
        for case in CASES:
            latents, emb, x, ref_img = refs[case.name]
            per_case[case.name] = diff_stats(ref_img, fn(case, latents, emb, x))["max_abs"]
        caught = max(per_case.values()) > 3
        table.append(dict(id=key, mistake=what, max_abs=per_case, caught=caught))
        log(f"    ({key:2s}) {what:80s} {list(per_case.values())}  {'caught' if caught else 'NOT CAUGHT'}")
    missed = [r for r in table if not r["id"].startswith("x") and not r["caught"]]
    if missed:
        raise SystemExit(f"sensitivity check failed: {missed}")
    return table


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

ALL_STAGES = ["tokenizers", "models", "goldens", "fp16", "scheduler", "tokjson", "broken", "readme"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(ALL_STAGES), help="comma-separated subset of: " + ",".join(ALL_STAGES))
    ap.add_argument("--fixtures", default=",".join(SPECS), help="comma-separated subset of: " + ",".join(SPECS))
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    names = [n for n in args.fixtures.split(",") if n]
    for s in stages:
        if s not in ALL_STAGES:
            raise SystemExit(f"unknown stage {s}")
    BUILD.mkdir(parents=True, exist_ok=True)
    log(f"build folder: {BUILD}")
    if "tokenizers" in stages:
        log("[tokenizers]")
        stage_tokenizers()
    if "models" in stages:
        stage_models(names)
    if "goldens" in stages:
        stage_goldens(names)
    for s, fn in (("fp16", stage_fp16), ("scheduler", stage_scheduler), ("tokjson", stage_tokjson),
                  ("broken", stage_broken), ("readme", stage_readme)):
        if s in stages:
            log(f"[{s}]")
            fn()
    log("done")


if __name__ == "__main__":
    main()
