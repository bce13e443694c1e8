#!/usr/bin/env python3
"""Regenerates every test fixture and golden output under models/.

This script is the record of where every binary under models/fixtures and models/goldens came from.
The goldens are regenerated with `bash models/regen_goldens.sh` (docs/diffusers-versions.md): this script runs
twice there, in the optimum environment (models/requirements.txt, diffusers 0.35.2: stages tokenizers,
checkpoints, goldens, options, fp16-golden) and in the diffusers one (models/requirements-diffusers-0.42.1.txt,
SD3_GOLDENS_OPTIMUM=keep: goldens, options, scheduler, tokjson). The fixtures themselves (stage models, fp16,
broken) come from the optimum environment alone:

    bash models/setup-python.sh && .venv-tools/bin/python models/make_fixtures.py

or a subset while iterating (stages run in this order, each reads what the earlier ones wrote; the build folder,
$SD3_FIXTURE_BUILD or <tmp>/sd3-onnx-fixture-build, keeps the uncommitted intermediates between runs):

    python models/make_fixtures.py --stages tokenizers,models,goldens,options,fp16,scheduler,tokjson,broken,readme

Nothing is downloaded: the CLIP BPE vocabulary comes from the open_clip wheel, the T5 sentencepiece model is
trained here on generated text, and every network has random (seeded) weights.

Stages
  tokenizers  CLIP vocab.json/merges.txt from open_clip's bpe_simple_vocab_16e6.txt.gz (the real CLIP BPE) and a
              small sentencepiece unigram model in T5's conventions (pad=0, eos=1, unk=2, 100 extra ids).
  models      two tiny random SD3-architecture diffusers pipelines (tiny-sd3 like SD3-medium, tiny-sd35 like
              SD3.5-medium), saved to the build folder (not committed) and exported with
              `optimum-cli export onnx --task text-to-image` into models/fixtures/<name>/.
  goldens     for each fixture and case: latents.npy, diffusers.png (PyTorch), optimum.png (ONNX Runtime via
              optimum), debug tensors for `cfg_negative`, and summary.json (pixel differences, the sensitivity
              table). Needs the diffusers checkpoints that `models` left in the build folder.
  options     goldens for pipeline options, in goldens/<fixture>/<case>/ next to the `goldens` cases: `no_t5`
              (diffusers with text_encoder_3=None, tokenizer_3=None: zeros replace the T5 states;
              `no_t5_clip_length` / `no_t5_omit` the other paddings, see OPTION_CASES), `clip_skip_1`
              (diffusers' clip_skip=1 on the positive prompt), `dynamic_shift` (a scheduler config with
              use_dynamic_shifting, 96x64), `t5_512` (max_sequence_length=512, a prompt of 256-512 T5 tokens)
              and `vae_tiling` (diffusers' vae.enable_tiling(), 128x96, tiled both ways; no optimum.png since
              optimum has no VAE tiling, untiled.png instead); request.json says `"t5": false` / `"clip_skip": 1`
              / `"scheduler_config": "scheduler_config.json"` (a file in the case folder) /
              `"max_sequence_length": 512` / `"vae_tiling": true`, and summary.json in the case folder holds the
              pixel differences, including to the same request without the option (which must exceed 3 levels). `--option-cases a,b` regenerates only those cases. Needs the `models` checkpoints.
  fp16        models/fixtures/tiny-sd3-fp16/{transformer,vae_decoder} converted to float16 (fp16 inputs/outputs)
              and its golden (goldens/tiny-sd3-fp16/cfg_negative).
  scheduler   models/goldens/scheduler.json (FlowMatchEulerDiscreteScheduler sigmas/timesteps).
  tokjson     models/goldens/tokenizers.json.gz (input ids for a prompt corpus, as diffusers tokenizes them).
  broken      models/fixtures/broken/*.onnx (hand-built invalid graphs for error tests).
  readme      models/fixtures/README.md (signatures, dimensions, tables, sizes: all generated from the files).

Determinism: every random draw is seeded (torch.manual_seed per component, random.Random for text), PyTorch and
ONNX Runtime run single-threaded. See models/fixtures/README.md for what is and is not bit-identical across runs.
"""

from __future__ import annotations

import argparse
import copy
import gzip
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

import diffusers  # noqa: E402

DIFFUSERS = diffusers.__version__  # the diffusers side of the goldens (models/regen_goldens.sh picks the release)
diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

MODELS = Path(__file__).resolve().parent  # <repo>/models
FIXTURES = MODELS / "fixtures"
GOLDENS = MODELS / "goldens"
# Build folder for everything that is NOT committed (diffusers checkpoints, raw optimum exports, tokenizer work).
BUILD = Path(os.environ.get("SD3_FIXTURE_BUILD", os.path.join(tempfile.gettempdir(), "sd3-onnx-fixture-build")))
PYBIN = Path(sys.executable).parent

# Which environment makes the optimum outputs (optimum.png, optimum_final_latents.npy: ONNX Runtime through
# optimum's ORT pipelines). "run": this process runs optimum (the models/requirements.txt environment: optimum-onnx
# needs transformers < 4.58). "keep": this environment has no optimum (diffusers 0.42.1 needs transformers 5), so
# every optimum output is taken unchanged from the goldens folder as it was when this process started, and only the
# diffusers side is rewritten. models/regen_goldens.sh runs the optimum environment first, then the diffusers one.
OPTIMUM_MODE = os.environ.get("SD3_GOLDENS_OPTIMUM", "run")
if OPTIMUM_MODE not in ("run", "keep"):
    raise SystemExit(f"SD3_GOLDENS_OPTIMUM must be run or keep, not {OPTIMUM_MODE!r}")
_KEPT_OPTIMUM: dict[str, bytes] = {}


def _snapshot_optimum_outputs():
    for f in sorted(GOLDENS.rglob("optimum*")):
        if f.is_file():
            _KEPT_OPTIMUM[f.relative_to(GOLDENS).as_posix()] = f.read_bytes()


def kept_optimum(path: Path):
    """The optimum output at `path` (under models/goldens) as it was when this process started: a PIL image for
    .png, a numpy array for .npy. Raises if there was none (run the optimum environment first)."""
    key = path.resolve().relative_to(GOLDENS.resolve()).as_posix()
    if key not in _KEPT_OPTIMUM:
        raise SystemExit(f"SD3_GOLDENS_OPTIMUM=keep but models/goldens/{key} does not exist: run the optimum "
                         "environment first (models/regen_goldens.sh does)")
    data = io.BytesIO(_KEPT_OPTIMUM[key])
    return np.load(data) if key.endswith(".npy") else Image.open(data).convert("RGB")


def write_kept_optimum(path: Path):
    """Writes the kept optimum output back to `path` (its case folder was deleted and rewritten)."""
    key = path.resolve().relative_to(GOLDENS.resolve()).as_posix()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_KEPT_OPTIMUM[key])


if OPTIMUM_MODE == "keep":
    _snapshot_optimum_outputs()

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
    """Reads a .json file, or a gzipped one (.json.gz)."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def gzip_file(path: Path) -> Path:
    """Compresses `path` to `path`.gz (level 9, deterministic: mtime 0, no file name in the header) and removes
    `path`. Returns the .gz path."""
    gz = path.with_name(path.name + ".gz")
    with open(gz, "wb") as raw, gzip.GzipFile(filename="", mtime=0, mode="wb", compresslevel=9, fileobj=raw) as f:
        f.write(path.read_bytes())
    path.unlink()
    return gz


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
    torch.manual_seed(spec.seed * 100 + 6)  # own seed: the re-drawn embeddings do not depend on the other inits
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
    link_shared_tokenizer_files(dst, index["tokenizer_2"][1])
    # Per-component configs as optimum wrote them, except the build-folder dependent `_name_or_path`.
    for cfg in dst.glob("*/config.json"):
        c = read_json(cfg)
        if "_name_or_path" in c:
            c["_name_or_path"] = f"{spec.name}/{cfg.parent.name}"
            write_json(cfg, c)


SHARED_TOKENIZER_PROBES = ["a photo of a cat!!! <|endoftext|> 日本", "hello!", "!!!", "!", "a ! b", "wow!!x", "",
                           "héllo! ünïcode! 🎉!", "!<|startoftext|>!", "long prompt with bangs! " * 20]


def link_shared_tokenizer_files(dst: Path, cls_name: str):
    """Replaces tokenizer_2/'s copies of CLIP-L's files by relative symlinks to ../tokenizer/ (git stores them as
    links; they stay inside the model folder, as the crate's loader requires): vocab.json and merges.txt when
    byte-identical, tokenizer.json when it differs only by added tokens that tokenizer_2/tokenizer_config.json's
    `added_tokens_decoder` lists with the same flags (CLIP-G's pad `!`), which transformers registers from the
    config on load (PreTrainedTokenizerFast.__init__; the crate's load_clip does the same). Checked: the folder
    loads to the same tokenizer (class from model_index.json, and CLIPTokenizerFast) before and after."""
    import transformers

    t1, t2 = dst / "tokenizer", dst / "tokenizer_2"
    classes = [getattr(transformers, cls_name), CLIPTokenizerFast]
    before = [c.from_pretrained(t2) for c in classes]
    listed = [{"id": int(i), **t} for i, t in read_json(t2 / "tokenizer_config.json").get("added_tokens_decoder", {}).items()]
    linked = []
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        a, b = t1 / name, t2 / name
        if not (a.is_file() and b.is_file()) or b.is_symlink():
            continue
        same = a.read_bytes() == b.read_bytes()
        if not same and name == "tokenizer.json":
            ja, jb = read_json(a), read_json(b)
            jb["added_tokens"] = [t for t in jb["added_tokens"] if t not in listed or t in ja["added_tokens"]]
            same = ja == jb
        if same:
            b.unlink()
            b.symlink_to(Path("..") / "tokenizer" / name)
            linked.append(name)
    after = [c.from_pretrained(t2) for c in classes]
    for x, y in zip(before, after):
        if x.is_fast:
            assert x.backend_tokenizer.to_str() == y.backend_tokenizer.to_str(), f"{t2}: {type(x).__name__} changed"
        assert x.pad_token_id == y.pad_token_id and len(x) == len(y), f"{t2}: {type(x).__name__} changed"
        for p in SHARED_TOKENIZER_PROBES:
            assert x(p).input_ids == y(p).input_ids, f"{t2}: {type(x).__name__} on {p!r} changed"
    log(f"  {dst.name}/tokenizer_2: {', '.join(linked) or 'nothing'} linked to ../tokenizer/")


def load_ort_pipeline(folder: Path):
    from optimum.onnxruntime import ORTStableDiffusion3Pipeline

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ORTStableDiffusion3Pipeline.from_pretrained(folder, session_options=so)


def stage_checkpoints(names):
    """The `models` stage without the ONNX export: only the diffusers checkpoints in the build folder, which the
    golden stages (and make_feature_goldens.py, export/make_skip_fixture.py) load. Run it in the environment that
    made the committed fixtures (models/requirements.txt): random init differs across transformers/diffusers
    versions, and the checkpoints must hold the weights the committed ONNX graphs hold (regen_goldens.sh checks
    that the diffusers 0.35.2 goldens come out bit-identical from them)."""
    for name in names:
        spec = SPECS[name]
        log(f"[checkpoints] {name}")
        pipe = build_pipeline(spec)
        src = diffusers_dir(name)
        shutil.rmtree(src, ignore_errors=True)
        pipe.save_pretrained(src)


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
    if not (diffusers_dir(name) / "model_index.json").is_file():
        raise SystemExit(f"{diffusers_dir(name)} is missing: run the `models` stage first (same SD3_FIXTURE_BUILD)")
    index = read_json(fixture / "model_index.json")
    import transformers

    toks = {}
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        cls = getattr(transformers, index[sub][1])
        toks[sub] = cls.from_pretrained(fixture / sub)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(diffusers_dir(name)), torch_dtype=torch.float32, **toks)
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
        opipe = None
        if OPTIMUM_MODE == "run":
            opipe = load_ort_pipeline(FIXTURES / name)
            opipe.set_progress_bar_config(disable=True)
        ref = OrtReference(FIXTURES / name)
        gdir = GOLDENS / name
        # Start clean in what this stage owns: its case folders and summary.json (the `options` stage and
        # make_feature_goldens.py own the other case folders; they rewrite their own).
        for old in (gdir.iterdir() if gdir.is_dir() else []):
            if old.name in {c.name for c in CASES} | {"summary.json"}:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
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
            if opipe is None:
                img_o = kept_optimum(out / "optimum.png")
                write_kept_optimum(out / "optimum.png")
            else:
                img_o = opipe(**pipe_kwargs(case, latents), output_type="pil").images[0]
                img_o.save(out / "optimum.png")
            a, b = to_uint8(img_d), to_uint8(img_o)
            c = ref.generate(case, latents.numpy())
            summary["cases"][case.name] = dict(diffusers_vs_optimum=diff_stats(a, b),
                                               numpy_ort_reference_vs_optimum=diff_stats(c, b),
                                               diffusers_pixels=pixel_stats(a), optimum_pixels=pixel_stats(b))
            log(f"  {case.name:13s} diffusers vs optimum {diff_stats(a, b)}; numpy/ORT reference vs optimum "
                f"{diff_stats(c, b)}; pixels {pixel_stats(a)}")
            if case.name == "cfg_negative":
                save_debug_tensors(pipe, case, latents, out)
                # optimum's final latents: the numpy-ORT reference reproduces them bit for bit (asserted), so an
                # ORT-based implementation can be checked against this file at zero tolerance.
                if opipe is None:
                    final_o = kept_optimum(out / "optimum_final_latents.npy")
                    write_kept_optimum(out / "optimum_final_latents.npy")
                else:
                    final_o = opipe(**pipe_kwargs(case, latents), output_type="latent").images.float().numpy()
                    np.save(out / "optimum_final_latents.npy", final_o)
                assert np.array_equal(ref.final_latents(case, latents.numpy()), final_o), "reference != optimum"
        summary["sensitivity"] = sensitivity_table(pipe)
        write_json(gdir / "summary.json", summary)


# ----------------------------------------------------------------------------------------------------------------
# Stage: options (goldens for pipeline options)
# ----------------------------------------------------------------------------------------------------------------

# (case, options). Options are what request.json records besides the plain request: "t5": False means the
# pipeline runs without T5 (diffusers: text_encoder_3=None, tokenizer_3=None, so _get_t5_prompt_embeds returns
# zeros [batch, max_sequence_length, joint_attention_dim] since diffusers 0.36 -- 0.35.2 used tokenizer_max_length = 77
# whatever max_sequence_length was, the no_t5_clip_length case); "clip_skip": n is
# StableDiffusion3Pipeline's clip_skip (hidden_states[-(n + 2)] of both CLIP encoders). In diffusers 0.35.2 to 0.42.1,
# encode_prompt passes clip_skip for the prompt only: the negative prompt is always encoded with clip_skip=None.
# Both tiny fixtures have CLIP encoders of 2 and 3 layers, so hidden_states has 3 and 4 entries and clip_skip 1
# (hidden_states[-3] = the embeddings output for CLIP-L) is valid for both.
#
# "scheduler_config": file means the model folder's scheduler/scheduler_config.json is replaced by that file (in the
# case folder): for `dynamic_shift`, the fixture's config with DYNAMIC_SHIFT (use_dynamic_shifting). The pipeline
# then computes mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
# with image_seq_len = (height // 8 // patch) * (width // 8 // patch) = 6 * 4 = 24 at 96x64, so mu = 1.5 + 8 * 3/48
# = 2.0: an effective shift e^2 = 7.39 instead of the static 3.0 (tiny-sd3) / 2.5 (tiny-sd35); at 64x64 mu would be
# 1.5, at 96x96 2.75, so the image size matters. With dynamic shifting the static `shift` is not used.
# `t5_512` is max_sequence_length=512 (a plain request field, above diffusers' default 256) with a prompt of 256 to
# 512 T5 tokens (asserted), so 256 truncates it and 512 does not.
DYNAMIC_SHIFT = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=64, base_shift=1.5,
                     max_shift=4.5)
T5_512_PROMPT = (
    "A vast, sunlit harbour town at midday seen from a hill above the bay, white houses with terracotta roofs "
    "stacked along narrow winding streets, laundry hanging between balconies, a bell tower with a green copper dome, "
    "dozens of small boats painted blue, yellow and red rocking in the turquoise water, a busy fish market on the "
    "quay with merchants shouting and cats waiting for scraps, an old lighthouse at the end of a long stone pier, "
    "olive trees and lemon groves on the terraced slopes behind the town, fluffy white clouds drifting over distant "
    "blue mountains, watercolor illustration with soft washes, fine ink outlines, warm summer palette"
)
OPTION_CASES = [
    (Case("no_t5", "a lighthouse on a cliff at sunset", "blurry, low quality", 64, 64, 4, 5.0, 256, 11),
     {"t5": False}),
    (Case("clip_skip_1", "a bowl of ripe oranges on a marble counter", "blurry, low quality", 64, 64, 4, 5.0, 256,
          12), {"clip_skip": 1}),
    (Case("dynamic_shift", "a red fox running through a snowy pine forest", "blurry, low quality", 96, 64, 4, 4.5,
          256, 13), {"scheduler_config": "scheduler_config.json"}),
    (Case("t5_512", T5_512_PROMPT, "blurry, low quality", 64, 64, 4, 5.0, 512, 14), {"max_sequence_length": 512}),
    (Case("vae_tiling", "a stone bridge over a river in autumn", "blurry, low quality", 128, 96, 4, 5.0, 256, 15),
     {"vae_tiling": True}),
    # The other no-T5 paddings (GenerationRequest::no_t5_padding), same prompt and latents as `no_t5`:
    # "clip_length" = 77 zero T5 tokens, what diffusers <= 0.35 did whatever max_sequence_length was (diffusers
    # 0.42.1 gives it with max_sequence_length=77; optimum 2.1.0's pipeline, on the diffusers 0.35.2 loop, with its
    # default 256); "omit" = no T5 tokens at all, only the 77 CLIP tokens (ComfyUI's SD3ClipModel without t5xxl;
    # diffusers 0.42.1 with prompt_embeds = the no-T5 embeddings cut to their first 77 tokens).
    (Case("no_t5_clip_length", "a lighthouse on a cliff at sunset", "blurry, low quality", 64, 64, 4, 5.0, 256, 11),
     {"t5": False, "no_t5_padding": "clip_length"}),
    (Case("no_t5_omit", "a lighthouse on a cliff at sunset", "blurry, low quality", 64, 64, 4, 5.0, 256, 11),
     {"t5": False, "no_t5_padding": "omit"}),
]
# `vae_tiling` is diffusers with pipe.vae.enable_tiling() (AutoencoderKL.tiled_decode): the tiny VAE has
# sample_size 64, so tile_latent_min_size 8, tile_sample_min_size 64, overlap 25% (tiles every 6 latents, blend
# 16 px); 128x96 (latents 16x12) is tiled in both directions. optimum's ORT pipeline has no VAE tiling, so the case
# has diffusers.png only, plus untiled.png (the same request decoded without tiling, what an ignored option gives).
# `no_t5` (diffusers >= 0.36: max_sequence_length zero T5 tokens) and `no_t5_omit` have no optimum.png either:
# optimum 2.1.0 runs the diffusers 0.35.2 loop (77 zero tokens), which is the `no_t5_clip_length` case.
NO_OPTIMUM = {"vae_tiling", "no_t5", "no_t5_omit"}


def without_t5_folder(name: str) -> Path:
    """A copy of the committed fixture without text_encoder_3/ and tokenizer_3/ (model_index.json says
    [null, null] for them, as diffusers writes for a missing component), in the build folder."""
    out = BUILD / f"{name}-onnx-no-t5"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(FIXTURES / name, out, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = read_json(out / "model_index.json")
    index["text_encoder_3"] = [None, None]
    index["tokenizer_3"] = [None, None]
    write_json(out / "model_index.json", index)
    return out


def dynamic_shift_config(name: str) -> dict:
    """The fixture's scheduler config with DYNAMIC_SHIFT applied."""
    cfg = read_json(FIXTURES / name / "scheduler" / "scheduler_config.json")
    assert not cfg["use_dynamic_shifting"]
    cfg.update(DYNAMIC_SHIFT)
    return cfg


def with_scheduler_folder(name: str, cfg: dict, tag: str) -> Path:
    """A copy of the committed fixture whose scheduler/scheduler_config.json is `cfg`, in the build folder."""
    out = BUILD / f"{name}-onnx-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(FIXTURES / name, out)
    write_json(out / "scheduler" / "scheduler_config.json", cfg)
    return out


@torch.no_grad()
def stage_options(names, only=None):
    """`only`: the option case names to (re)generate (default all); other case folders are left as they are."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    unknown = set(only or []) - {c.name for c, _ in OPTION_CASES}
    if unknown:
        raise SystemExit(f"unknown option cases {sorted(unknown)}")
    for name in names:
        log(f"[options] {name}")
        pipe = load_diffusers_pipeline(name)
        pipe_no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        pipe_no_t5.set_progress_bar_config(disable=True)
        dyn_cfg = dynamic_shift_config(name)
        pipe_dyn = StableDiffusion3Pipeline(
            **{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(dyn_cfg)})
        pipe_dyn.set_progress_bar_config(disable=True)
        opipe = opipe_no_t5 = opipe_dyn = None
        if OPTIMUM_MODE == "run":
            opipe = load_ort_pipeline(FIXTURES / name)
            opipe.set_progress_bar_config(disable=True)
            opipe_no_t5 = load_ort_pipeline(without_t5_folder(name))
            opipe_no_t5.set_progress_bar_config(disable=True)
            assert opipe_no_t5.text_encoder_3 is None
            opipe_dyn = load_ort_pipeline(with_scheduler_folder(name, dyn_cfg, "dynamic-shift"))
            opipe_dyn.set_progress_bar_config(disable=True)
            assert opipe_dyn.scheduler.config.use_dynamic_shifting
        for case, options in OPTION_CASES:
            if only and case.name not in only:
                continue
            out = GOLDENS / name / case.name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            latents = initial_latents(case)
            np.save(out / "latents.npy", latents.numpy())
            req = request_json(case)
            req["latents"] = "latents.npy"
            req["latent_seed"] = case.latent_seed
            req.update(options)
            write_json(out / "request.json", req)
            t5 = options.get("t5", True)
            extra = {"clip_skip": options["clip_skip"]} if "clip_skip" in options else {}
            d_pipe, o_pipe = (pipe, opipe) if t5 else (pipe_no_t5, opipe_no_t5)
            plain_kw = pipe_kwargs(case, latents)
            if "scheduler_config" in options:
                write_json(out / options["scheduler_config"], dyn_cfg)
                d_pipe, o_pipe = pipe_dyn, opipe_dyn
            if "max_sequence_length" in options:
                n = len(pipe.tokenizer_3(case.prompt).input_ids)
                assert 256 < n < options["max_sequence_length"], f"{case.name}: {n} T5 tokens"
                plain_kw["max_sequence_length"] = 256
            if options.get("vae_tiling"):
                vae = pipe.vae
                assert vae.tile_latent_min_size < max(case.width, case.height) // pipe.vae_scale_factor
                assert vae.tile_sample_min_size < min(case.width, case.height), "tiling must happen both ways"
                vae.enable_tiling()
                try:
                    img_d = pipe(**pipe_kwargs(case, latents), output_type="pil").images[0]
                finally:
                    vae.disable_tiling()
            elif options.get("no_t5_padding") == "clip_length":
                kw = dict(pipe_kwargs(case, latents), max_sequence_length=CLIP_MAX_LENGTH)
                img_d = d_pipe(**kw, output_type="pil").images[0]
            elif options.get("no_t5_padding") == "omit":
                emb = no_t5_omitted_embeds(d_pipe, case)
                kw = pipe_kwargs(case, latents)
                del kw["prompt"], kw["negative_prompt"]
                img_d = d_pipe(**kw, **emb, output_type="pil").images[0]
            else:
                img_d = d_pipe(**pipe_kwargs(case, latents), **extra, output_type="pil").images[0]
            img_d.save(out / "diffusers.png")
            img_o = None
            if case.name not in NO_OPTIMUM:
                if OPTIMUM_MODE == "keep":
                    img_o = kept_optimum(out / "optimum.png")
                    write_kept_optimum(out / "optimum.png")
                else:
                    img_o = o_pipe(**pipe_kwargs(case, latents), **extra, output_type="pil").images[0]
                    img_o.save(out / "optimum.png")
            # The same request without the option (static scheduler config, max_sequence_length 256): the golden
            # must differ from it clearly, else a test could not tell an ignored option from a working one.
            plain_img = pipe(**plain_kw, output_type="pil").images[0]
            plain = to_uint8(plain_img)
            a = to_uint8(img_d)
            if img_o is not None:
                b = to_uint8(img_o)
                summary = dict(options=options, diffusers_vs_optimum=diff_stats(a, b),
                               diffusers_vs_diffusers_without_option=diff_stats(a, plain),
                               diffusers_pixels=pixel_stats(a), optimum_pixels=pixel_stats(b))
            elif options.get("vae_tiling"):
                plain_img.save(out / "untiled.png")
                summary = dict(options=options,
                               optimum="none: optimum's ORT pipeline has no VAE tiling; untiled.png is the same "
                                       "request decoded without tiling (diffusers)",
                               diffusers_vs_diffusers_without_option=diff_stats(a, plain),
                               diffusers_pixels=pixel_stats(a), untiled_pixels=pixel_stats(plain))
            else:
                summary = dict(options=options,
                               optimum="none: optimum 2.1.0 runs the diffusers 0.35.2 loop, whose no-T5 padding is "
                                       "77 zero tokens (the no_t5_clip_length case)",
                               diffusers_vs_diffusers_without_option=diff_stats(a, plain),
                               diffusers_pixels=pixel_stats(a))
            if options.get("t5") is False:
                # Informative: how far the three no-T5 paddings are apart (the diffusers 0.35 -> 0.36 change).
                others = {}
                for pad in ("max_sequence_length", "clip_length", "omit"):
                    if pad == options.get("no_t5_padding", "max_sequence_length"):
                        continue
                    kw = pipe_kwargs(case, latents)
                    if pad == "clip_length":
                        kw["max_sequence_length"] = CLIP_MAX_LENGTH
                    elif pad == "omit":
                        del kw["prompt"], kw["negative_prompt"]
                        kw.update(no_t5_omitted_embeds(pipe_no_t5, case))
                    others[f"diffusers_vs_no_t5_padding_{pad}"] = diff_stats(
                        a, to_uint8(pipe_no_t5(**kw, output_type="pil").images[0]))
                summary.update(others)
            if options.get("vae_tiling"):
                v = pipe.vae
                summary["vae_tiling"] = dict(tile_sample_min_size=v.tile_sample_min_size,
                                             tile_latent_min_size=v.tile_latent_min_size,
                                             tile_overlap_factor=v.tile_overlap_factor,
                                             latent_size=[case.height // pipe.vae_scale_factor,
                                                          case.width // pipe.vae_scale_factor])
            if "scheduler_config" in options:
                # Informative: mu and the schedules with and without dynamic shifting.
                p = pipe.transformer.config.patch_size
                seq = (case.height // pipe.vae_scale_factor // p) * (case.width // pipe.vae_scale_factor // p)
                mu = calculate_shift(seq, dyn_cfg["base_image_seq_len"], dyn_cfg["max_image_seq_len"],
                                     dyn_cfg["base_shift"], dyn_cfg["max_shift"])
                s_dyn = FlowMatchEulerDiscreteScheduler.from_config(dyn_cfg)
                s_dyn.set_timesteps(case.steps, mu=mu)
                s_static = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
                s_static.set_timesteps(case.steps)
                summary["dynamic_shift"] = dict(image_seq_len=seq, mu=mu, sigmas=f32list(s_dyn.sigmas),
                                                static_sigmas=f32list(s_static.sigmas))
            if "max_sequence_length" in options:
                summary["t5_tokens"] = len(pipe.tokenizer_3(case.prompt).input_ids)
            if "clip_skip" in options:
                # Informative: the mistake of applying clip_skip to the negative prompt too.
                enc = dict(prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                           max_sequence_length=case.max_sequence_length, clip_skip=options["clip_skip"])
                pe, _, ppe, _ = pipe.encode_prompt(prompt=case.prompt, **enc)
                npe, _, nppe, _ = pipe.encode_prompt(prompt=case.negative_prompt, **enc)
                kw = pipe_kwargs(case, latents)
                del kw["prompt"], kw["negative_prompt"]
                both = to_uint8(pipe(**kw, prompt_embeds=pe, pooled_prompt_embeds=ppe, negative_prompt_embeds=npe,
                                     negative_pooled_prompt_embeds=nppe, output_type="pil").images[0])
                summary["diffusers_vs_clip_skip_on_negative_too"] = diff_stats(a, both)
            write_json(out / "summary.json", summary)
            vs_o = diff_stats(a, b) if img_o is not None else "n/a (no optimum)"
            log(f"  {case.name:13s} {options} diffusers vs optimum {vs_o}; vs without the option "
                f"{diff_stats(a, plain)}")
            if diff_stats(a, plain)["max_abs"] <= 3:
                raise SystemExit(f"{name}/{case.name}: the option moves the image by 3 levels or less")


def no_t5_omitted_embeds(pipe_no_t5, case: Case) -> dict:
    """ComfyUI's conditioning without T5: the 77 CLIP tokens only (the no-T5 embeddings cut before the zeros)."""
    pe, npe, ppe, nppe = pipe_no_t5.encode_prompt(
        prompt=case.prompt, prompt_2=None, prompt_3=None, negative_prompt=case.negative_prompt,
        do_classifier_free_guidance=True, max_sequence_length=case.max_sequence_length)
    return dict(prompt_embeds=pe[:, :CLIP_MAX_LENGTH], negative_prompt_embeds=npe[:, :CLIP_MAX_LENGTH],
                pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe)


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
    """The denoising loop of StableDiffusion3Pipeline.__call__ (diffusers 0.35.2 to 0.42.1, no skip-layer guidance), with
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
# A plain numpy + onnxruntime re-implementation of the pipeline: the executable form of docs/design.md's numerics.
# It must reproduce optimum.png exactly on the fp32 fixtures (checked in the goldens stage); on the fp16 fixture
# it is the "f32 host math, f16 only at graph boundaries" reference (optimum instead rounds latents to f16).
# ----------------------------------------------------------------------------------------------------------------


def flow_match_schedule(shift: float, steps: int, num_train_timesteps=1000):
    """sigmas (steps+1, f32, last 0) and timesteps (steps, f32) exactly as FlowMatchEulerDiscreteScheduler
    (use_dynamic_shifting=False) computes them: sigma_min is shift(1/1000) evaluated in float32 (in __init__),
    the linspace and the shift are evaluated in float64, cast to float32, and timesteps = sigmas_f32 * 1000 in f32."""
    n = num_train_timesteps
    s_min = np.float32(1.0) / np.float32(n)  # sigmas[-1] of the training schedule: 1/1000 in f32
    s_min = np.float32(shift) * s_min / (np.float32(1) + np.float32(shift - 1) * s_min)
    sigma_max, sigma_min = 1.0, float(s_min)
    t = np.linspace(sigma_max * n, sigma_min * n, steps)  # float64
    s = t / n
    s = shift * s / (1 + (shift - 1) * s)
    sig = s.astype(np.float32)
    timesteps = sig * np.float32(n)
    return np.concatenate([sig, np.zeros(1, np.float32)]), timesteps


class OrtReference:
    """Loads a fixture folder like the Rust crate does: tokenizers from their folders, every graph through ORT,
    dimensions from the graphs and configs, dtypes from the sessions."""

    def __init__(self, folder: Path):
        import transformers

        index = read_json(folder / "model_index.json")
        self.tok = [getattr(transformers, index[s][1]).from_pretrained(folder / s) for s in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = lambda c: ort.InferenceSession(str(folder / c / "model.onnx"), so, providers=["CPUExecutionProvider"])  # noqa: E731
        self.te = [sess(c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        self.transformer, self.vae = sess("transformer"), sess("vae_decoder")
        self.shift = read_json(folder / "scheduler" / "scheduler_config.json")["shift"]
        vae_cfg = read_json(folder / "vae_decoder" / "config.json")
        self.scaling, self.shift_factor = vae_cfg["scaling_factor"], vae_cfg["shift_factor"]

    @staticmethod
    def run(sess, feeds: dict) -> dict:
        """Casts every float input to the graph's element type and every float output back to float32."""
        types = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
        fed = {i.name: np.ascontiguousarray(feeds[i.name]).astype(types[i.type]) for i in sess.get_inputs()}
        outs = sess.run(None, fed)
        return {o.name: (v.astype(np.float32) if v.dtype == np.float16 else v) for o, v in zip(sess.get_outputs(), outs)}

    def encode(self, prompt: str, max_sequence_length: int):
        ctx, pooled = [], []
        for tok, te in zip(self.tok[:2], self.te[:2]):
            ids = tok(prompt, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
            out = self.run(te, {"input_ids": np.array([ids], np.int64)})
            n_layers = sum(1 for k in out if k.startswith("hidden_states.")) - 1
            ctx.append(out[f"hidden_states.{n_layers - 1}"])  # penultimate layer, before the final layer norm
            pooled.append(out["text_embeds"])
        ids = self.tok[2](prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                          add_special_tokens=True).input_ids
        t5 = self.run(self.te[2], {"input_ids": np.array([ids], np.int64)})["last_hidden_state"]
        clip = np.concatenate(ctx, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)

    def generate(self, case: Case, latents: np.ndarray) -> np.ndarray:
        x = self.final_latents(case, latents)
        z = x / np.float32(self.scaling) + np.float32(self.shift_factor)
        img = self.run(self.vae, {"latent_sample": z})["sample"]
        img = np.clip(img / np.float32(2) + np.float32(0.5), 0, 1)  # VaeImageProcessor.denormalize
        return (img[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)  # numpy_to_pil: round half to even

    def final_latents(self, case: Case, latents: np.ndarray) -> np.ndarray:
        pe, ppe = self.encode(case.prompt, case.max_sequence_length)
        cfg = case.guidance > 1
        if cfg:
            npe, nppe = self.encode(case.negative_prompt, case.max_sequence_length)
            pe, ppe = np.concatenate([npe, pe]), np.concatenate([nppe, ppe])
        sigmas, timesteps = flow_match_schedule(self.shift, case.steps)
        x = latents.astype(np.float32)
        g = np.float32(case.guidance)
        for i, t in enumerate(timesteps):
            inp = np.concatenate([x, x]) if cfg else x
            v = self.run(self.transformer, {"hidden_states": inp, "encoder_hidden_states": pe, "pooled_projections": ppe,
                                            "timestep": np.full((inp.shape[0],), t, np.float32)})["out_hidden_states"]
            if cfg:
                vu, vc = v[:1], v[1:]
                v = vu + g * (vc - vu)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler step in float32
        return x


# ----------------------------------------------------------------------------------------------------------------
# Stage: fp16
# ----------------------------------------------------------------------------------------------------------------


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """convert_float_to_float16 appends the Cast nodes it inserts for Resize's float32 `scales` input after their
    consumers; ORT copes, onnx.checker does not. Re-order the nodes topologically (stable)."""
    g = model.graph
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                order.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("graph has a cycle or a dangling input")
        pending = rest
    del g.node[:]
    g.node.extend(order)
    return model


def stage_fp16(convert=True):
    """tiny-sd3's transformer and VAE decoder converted to float16 with float16 inputs AND outputs
    (onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types=False): every float input, the
    timestep included, becomes tensor(float16). Tests overlay this folder onto a copy of tiny-sd3.
    `convert=False` (stage `fp16-golden`): the committed float16 graphs as they are, only the golden is rewritten."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst = FIXTURES / "tiny-sd3-fp16"
    if convert:
        shutil.rmtree(dst, ignore_errors=True)
    for comp in ("transformer", "vae_decoder") if convert else ():
        (dst / comp).mkdir(parents=True)
        m = onnx.load(str(FIXTURES / "tiny-sd3" / comp / "model.onnx"))
        m16 = toposort(convert_float_to_float16(m, keep_io_types=False))
        onnx.checker.check_model(m16)
        onnx.save(m16, str(dst / comp / "model.onnx"))
        shutil.copy2(FIXTURES / "tiny-sd3" / comp / "config.json", dst / comp / "config.json")
        s = ort.InferenceSession(str(dst / comp / "model.onnx"), providers=["CPUExecutionProvider"])
        assert all(t.type == "tensor(float16)" for t in list(s.get_inputs()) + list(s.get_outputs())), comp
    # The overlay the tests build: a copy of tiny-sd3 with the two fp16 graphs on top (build folder only).
    overlay = BUILD / "tiny-sd3-fp16-overlay"
    shutil.rmtree(overlay, ignore_errors=True)
    shutil.copytree(FIXTURES / "tiny-sd3", overlay)
    shutil.copytree(dst, overlay, dirs_exist_ok=True)

    case = CASES[0]
    out = GOLDENS / "tiny-sd3-fp16" / case.name
    shutil.rmtree(out.parent, ignore_errors=True)
    out.mkdir(parents=True)
    latents = initial_latents(case)
    np.save(out / "latents.npy", latents.numpy())
    opipe = load_ort_pipeline(overlay)
    opipe.set_progress_bar_config(disable=True)
    img_o = to_uint8(opipe(**pipe_kwargs(case, latents), output_type="pil").images[0])
    Image.fromarray(img_o).save(out / "optimum.png")
    img_r = OrtReference(overlay).generate(case, latents.numpy())
    Image.fromarray(img_r).save(out / "ort_f32_host.png")
    fp32 = to_uint8(Image.open(GOLDENS / "tiny-sd3" / case.name / "optimum.png"))
    req = request_json(case)
    req.update(
        latents="latents.npy",
        latent_seed=case.latent_seed,
        fixture="models/fixtures/tiny-sd3 with models/fixtures/tiny-sd3-fp16 copied over it",
        numerics={
            "optimum.png": "optimum ORTStableDiffusion3Pipeline (diffusers 0.35.2 loop on torch CPU tensors): the "
            "timestep and all transformer/VAE inputs are cast to float16 at the graph; the transformer output stays "
            "float16, so CFG (v_u + g*(v_c - v_u)) runs in float16 and FlowMatchEulerDiscreteScheduler.step "
            "upcasts the sample to float32 but casts the new latents back to float16 after every step; "
            "z / scaling_factor + shift_factor and the postprocess run in float16 too.",
            "ort_f32_host.png": "plain onnxruntime with float32 host math: latents, CFG and Euler steps in float32, "
            "inputs cast to float16 only at the graph boundary, outputs cast back to float32 (OrtReference in "
            "make_fixtures.py).",
        },
    )
    write_json(out / "request.json", req)
    summary = {
        "fixture": req["fixture"],
        "cases": {case.name: dict(
            optimum_vs_ort_f32_host=diff_stats(img_o, img_r),
            optimum_vs_fp32_optimum=diff_stats(img_o, fp32),
            ort_f32_host_vs_fp32_optimum=diff_stats(img_r, fp32),
            optimum_pixels=pixel_stats(img_o),
        )},
    }
    write_json(out.parent / "summary.json", summary)
    for k, v in summary["cases"][case.name].items():
        log(f"  {k}: {v}")


# ----------------------------------------------------------------------------------------------------------------
# Stage: scheduler
# ----------------------------------------------------------------------------------------------------------------


def stage_scheduler():
    """sigmas/timesteps of FlowMatchEulerDiscreteScheduler through the pipeline's own call path
    (pipeline_stable_diffusion_3.retrieve_timesteps -> set_timesteps(num_inference_steps, mu=...))."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    cases = []

    def add(config: dict, steps: int, mu=None, image_seq_len=None):
        sched = FlowMatchEulerDiscreteScheduler(**config)
        kwargs = {} if mu is None else {"mu": mu}
        timesteps, n = retrieve_timesteps(sched, steps, "cpu", **kwargs)
        assert n == steps and sched.sigmas.dtype == torch.float32 and timesteps.dtype == torch.float32
        cfg = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        case = {"config": cfg, "steps": steps}
        if mu is not None:
            case["mu"] = mu
            case["image_seq_len"] = image_seq_len
        case["sigmas"] = f32list(sched.sigmas)
        case["timesteps"] = f32list(timesteps)
        if not cfg["use_dynamic_shifting"]:  # our numpy transcription must agree bit for bit
            sig, ts = flow_match_schedule(cfg["shift"], steps)
            assert np.array_equal(sig, sched.sigmas.numpy()) and np.array_equal(ts, timesteps.numpy())
        cases.append(case)

    for shift in (1.0, 3.0, 2.5, 5.0):
        for steps in (1, 2, 4, 8, 28, 50):
            add(dict(num_train_timesteps=1000, shift=shift), steps)
    # Dynamic (resolution-dependent) shifting, as Flux/SD3.5-style configs use it: mu from the image token count,
    # computed like StableDiffusion3Pipeline.__call__ does (calculate_shift with the config's bounds).
    dyn = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
               base_image_seq_len=256, max_image_seq_len=4096)
    for px in (64, 512, 1024):
        seq = (px // 8 // 2) ** 2
        mu = calculate_shift(seq, dyn["base_image_seq_len"], dyn["max_image_seq_len"], dyn["base_shift"], dyn["max_shift"])
        for steps in (4, 28):
            add(dyn, steps, mu=mu, image_seq_len=seq)
    add(dict(dyn, time_shift_type="linear"), 8, mu=1.0, image_seq_len=None)
    doc = {
        "generator": f"models/make_fixtures.py (stage scheduler), diffusers {DIFFUSERS} FlowMatchEulerDiscreteScheduler",
        "notes": [
            "sigmas has steps+1 entries (terminal 0 appended); timesteps has steps entries; the transformer is fed "
            "timesteps[i] (= sigmas[i] * 1000 in float32) and the Euler step is x += (sigmas[i+1] - sigmas[i]) * v.",
            "All values are float32 written as the exactly equal float64 decimal.",
            "Static shifting: sigma_min = shift(1/1000) is computed in float32 (scheduler __init__), then "
            "t = linspace(1000*sigma_max, 1000*sigma_min, steps) and shift(t/1000) are computed in float64, cast to "
            "float32, and timesteps = sigmas_f32 * 1000 in float32. shift(s) = k*s / (1 + (k-1)*s).",
            "Dynamic shifting: the `shift` config value is ignored; sigmas = exp(mu) / (exp(mu) + (1/t - 1)) "
            "(time_shift_type exponential) or mu / (mu + (1/t - 1)) (linear), t as above but from the unshifted "
            "training schedule (sigma_min = 1/1000). mu = calculate_shift(image_seq_len, base_image_seq_len, "
            "max_image_seq_len, base_shift, max_shift) with image_seq_len = (latent_h/patch) * (latent_w/patch).",
        ],
        "cases": cases,
    }
    write_json(GOLDENS / "scheduler.json", doc)
    log(f"  {len(cases)} cases")


# ----------------------------------------------------------------------------------------------------------------
# Stage: tokjson
# ----------------------------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = [
    # empty / whitespace only
    "", " ", "   ", "\t", "\n\n", " \t\n ",
    # plain words, case
    "cat", "a photo of a cat", "A Photo Of A CAT", "ASTRONAUT riding a Horse", "hElLo WoRlD",
    "an astronaut riding a horse on the moon, highly detailed, 8k",
    # whitespace runs, leading / trailing
    "a   b", "a\tb", "a\nb", "a \t\n b", "   leading spaces", "trailing spaces   ", "  both  ", "line one\nline two\r\nline three",
    # punctuation, "!" is CLIP-G's pad token (an added special token there)
    "!", "!!!", "hello!", "hello!!! world", "wow!?", "!a!b!", "a,b;c:d", "dots... and…ellipsis",
    "(parentheses) [brackets] {braces}", "quotes \"double\" 'single'", "“curly quotes” ‘single’",
    "hyphen-ated em—dash en–dash", "slash/back\\slash", "#hashtag @mention $100 50% a&b", "* bullet ~tilde `code` ^caret _under_",
    # special tokens written literally
    "<|endoftext|>", "a cat <|endoftext|> a dog", "<|startoftext|>hello", "<|ENDOFTEXT|>", "<|endoftext|><|endoftext|>",
    "<pad>", "</s>", "<unk>", "<extra_id_0> and <extra_id_99>",
    # numbers
    "123", "3.14159", "1,000,000", "2024-05-01", "4k 8k uhd", "0.5x zoom", "1st 2nd 3rd 100th",
    # contractions
    "don't", "it's", "we'll", "I'M", "they're", "can't won't shouldn't've", "rock 'n' roll",
    # HTML-ish and entities (ftfy unescapes entities in the slow CLIP tokenizer when no '<' is present)
    "<b>bold</b> <img src=x>", "&amp; &lt; &gt;", "a &amp; b", "<p>html &amp; entity</p>", "fish &amp; chips",
    # unicode: accents, composed / combining, ligatures, width forms, mojibake, other scripts, invisible chars
    "café", "naïve façade", "crème brûlée", "Zürich über Ångström", "résumé", "niño", "e\u0301 combining acute",
    "ﬁne ﬂower ligatures", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "cafÃ© mojibake", "ß straße STRASSE", "İstanbul ıi",
    "ΑΒΓ αβγ greek", "кот на крыше", "עברית", "العربية", "हिन्दी",
    "soft\u00adhyphen", "zero\u200bwidth", "nbsp\u00a0space", "tab\u3000ideographic space",
    # CJK
    "日本の桜", "中文提示词：一只猫", "한국어 고양이", "東京タワー at night", "ｶﾀｶﾅ halfwidth",
    # emoji
    "🐱", "a cat 🐱 on a 🚀", "👩‍🚀 astronaut", "🇯🇵 flag", "❤️ love", "👍🏽 thumbs",
    # mixed
    "Photo_of-a.cat/IMG_1234.JPG", "C++ and C# code", "email me@example.com", "https://example.com/a?b=c",
]


def corpus_with_long_prompts() -> list[dict]:
    """The corpus plus length edge cases (the text is stored verbatim in the JSON)."""
    items = [dict(prompt=p) for p in TOKENIZER_CORPUS]
    items.append(dict(prompt=LONG_PROMPT, note="> 77 CLIP tokens, > 32 T5 tokens"))
    very_long = " ".join([LONG_PROMPT] * 3)
    items.append(dict(prompt=very_long, note="> 77 CLIP tokens and > 256 T5 tokens"))
    # CLIP boundary: "cat" is one CLIP token; 75 of them fill 77 exactly with <|startoftext|> and <|endoftext|>.
    for n in (75, 76, 77):
        items.append(dict(prompt=" ".join(["cat"] * n), note=f"{n} CLIP word tokens"))
    # T5 boundary: " cat" is one T5 piece; 255 of them + </s> fill 256 exactly; 76 + </s> fill 77.
    for n in (76, 77, 255, 256):
        items.append(dict(prompt=" ".join(["cat"] * n), note=f"{n} T5 pieces"))
    return items


def clip_ids(tok, prompt: str) -> dict:
    """What StableDiffusion3Pipeline._get_clip_prompt_embeds feeds the CLIP encoders, and what it would log."""
    ids = tok(prompt, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
    untruncated = tok(prompt, padding="longest").input_ids
    removed = None
    if len(untruncated) >= len(ids) and untruncated != ids:
        removed = tok.batch_decode([untruncated[CLIP_MAX_LENGTH - 1 : -1]])[0]
    return dict(input_ids=ids, untruncated_ids=untruncated, removed_text=removed)


def t5_ids(tok, prompt: str, max_length: int) -> dict:
    """What StableDiffusion3Pipeline._get_t5_prompt_embeds feeds T5. NB diffusers slices the logged removed text
    with the CLIP length (untruncated_ids[:, 77 - 1 : -1]) whatever max_sequence_length is; removed_text is that
    string verbatim, truncated_text is what was really cut (untruncated_ids[max_length - 1 : -1])."""
    ids = tok(prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True).input_ids
    untruncated = tok(prompt, padding="longest").input_ids
    removed = truncated = None
    if len(untruncated) >= len(ids) and untruncated != ids:
        removed = tok.batch_decode([untruncated[CLIP_MAX_LENGTH - 1 : -1]])[0]
        truncated = tok.batch_decode([untruncated[max_length - 1 : -1]])[0]
    return dict(input_ids=ids, untruncated_ids=untruncated, removed_text=removed, truncated_text=truncated)


def stage_tokjson():
    import ftfy
    import tokenizers
    import transformers

    sources = {}
    for name in ("tiny-sd3", "tiny-sd35"):
        index = read_json(FIXTURES / name / "model_index.json")
        sources[name] = {k: getattr(transformers, index[sub][1]).from_pretrained(FIXTURES / name / sub)
                         for k, sub in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"), ("t5", "tokenizer_3"))}
    fast35 = {k: CLIPTokenizerFast.from_pretrained(FIXTURES / "tiny-sd35" / sub)
              for k, sub in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"))}
    # transformers 5 has no slow (ftfy / sentencepiece) tokenizers: CLIPTokenizer is tokenizers-backed, converted from
    # vocab.json + merges.txt, and T5Tokenizer(vocab_file=...) no longer runs sentencepiece, so the slow/fast T5
    # comparison below is only made with transformers 4.
    tf5 = int(transformers.__version__.split(".")[0]) >= 5
    t5_slow = None if tf5 else T5Tokenizer(vocab_file=str(FIXTURES / "tiny-sd35" / "tokenizer_3" / "spiece.model"),
                                           extra_ids=100)
    clip35 = ("CLIPTokenizer (transformers 5: tokenizers-backed, converted from vocab.json + merges.txt)" if tf5 else
              "CLIPTokenizer (slow, vocab.json + merges.txt, ftfy installed)")
    descr = {
        "tiny-sd3": {k: f"models/fixtures/tiny-sd3/{sub}: {type(sources['tiny-sd3'][k]).__name__} from tokenizer.json"
                     for k, sub in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"), ("t5", "tokenizer_3"))},
        "tiny-sd35": {
            "clip_l": f"models/fixtures/tiny-sd35/tokenizer: {clip35}",
            "clip_g": f"models/fixtures/tiny-sd35/tokenizer_2: {clip35}",
            "t5": "models/fixtures/tiny-sd35/tokenizer_3: T5TokenizerFast from tokenizer.json",
        },
        "tiny-sd35-fast": {
            "clip_l": "models/fixtures/tiny-sd35/tokenizer: CLIPTokenizerFast converted from vocab.json + merges.txt",
            "clip_g": "models/fixtures/tiny-sd35/tokenizer_2: CLIPTokenizerFast converted from vocab.json + merges.txt",
        },
    }
    cases, disagreements = [], []
    for item in corpus_with_long_prompts():
        p = item["prompt"]
        entry = dict(item)
        for name, toks in sources.items():
            entry[name] = {"clip_l": clip_ids(toks["clip_l"], p), "clip_g": clip_ids(toks["clip_g"], p),
                           "t5_256": t5_ids(toks["t5"], p, 256), "t5_77": t5_ids(toks["t5"], p, 77)}
        entry["tiny-sd35-fast"] = {k: clip_ids(t, p) for k, t in fast35.items()}
        # Where do the tokenizers disagree?
        for k in ("clip_l", "clip_g"):
            slow, fast, sd3 = (entry["tiny-sd35"][k]["input_ids"], entry["tiny-sd35-fast"][k]["input_ids"],
                               entry["tiny-sd3"][k]["input_ids"])
            assert fast == sd3, "tiny-sd3's tokenizer.json must equal the fast conversion of tiny-sd35's vocab/merges"
            if slow != fast:
                disagreements.append(dict(prompt=p, tokenizer=k, slow_clip=strip_pad(slow, k), fast_clip=strip_pad(fast, k),
                                          slow_tokens=toks_of(sources["tiny-sd35"][k], slow, k),
                                          fast_tokens=toks_of(fast35[k], fast, k)))
        for n in (256, 77):
            assert entry["tiny-sd3"][f"t5_{n}"] == entry["tiny-sd35"][f"t5_{n}"]
        sp = None if t5_slow is None else t5_slow(p, padding="max_length", max_length=256, truncation=True).input_ids
        if sp is not None and sp != entry["tiny-sd35"]["t5_256"]["input_ids"]:
            disagreements.append(dict(prompt=p, tokenizer="t5", slow_t5_sentencepiece=[i for i in sp if i],
                                      fast_t5=[i for i in entry["tiny-sd35"]["t5_256"]["input_ids"] if i]))
        cases.append(entry)
    doc = {
        "generator": f"models/make_fixtures.py (stage tokjson); diffusers {DIFFUSERS}, transformers "
                     f"{transformers.__version__}, tokenizers {tokenizers.__version__}, ftfy {ftfy.__version__}",
        "how": {
            "clip_l / clip_g": "tokenizer(prompt, padding='max_length', max_length=77, truncation=True).input_ids; "
                               "untruncated_ids = tokenizer(prompt, padding='longest').input_ids; removed_text = "
                               "tokenizer.batch_decode(untruncated_ids[76:-1]) when untruncated is longer (what "
                               "diffusers logs), else null",
            "t5_N": "tokenizer_3(prompt, padding='max_length', max_length=N, truncation=True, add_special_tokens=True)"
                    ".input_ids for N = 256 (default max_sequence_length) and 77; removed_text is what diffusers logs "
                    "(it slices untruncated_ids[76:-1] with the CLIP length whatever N is); truncated_text is "
                    "untruncated_ids[N-1:-1] decoded (what was really cut)",
        },
        "tokenizers": descr,
        "pad_ids": {"clip_l": 49407, "clip_g": 0, "t5": 0},
        "notes": [
            "tiny-sd3 and tiny-sd35 share the same CLIP vocabulary/merges and the same T5 tokenizer; they differ in "
            "layout (tokenizer.json vs vocab.json + merges.txt) and so in slow vs fast CLIP tokenization.",
            "tiny-sd35-fast equals tiny-sd3 for every prompt (asserted).",
            "CLIP-G's pad token '!' is an added special token (as in the real SD3 tokenizer_2): every '!' typed in a "
            "prompt becomes id 0 for CLIP-G (never merged, e.g. '!!!' -> 0 0 0), while CLIP-L BPE-encodes it.",
            "'disagreements' lists every prompt where the slow CLIPTokenizer (ftfy normalization) and the fast one "
            "(tokenizer.json: NFC + whitespace collapse + lowercase) give different ids, and where the T5 "
            "sentencepiece (slow) and tokenizer.json (fast) tokenizers differ."
            + (" With transformers 5 (no slow tokenizers) the CLIP layouts agree and no T5 comparison is made; "
               "the disagreements transformers 4.57.1 showed are in docs/diffusers-versions.md." if tf5 else ""),
        ],
        "disagreements": disagreements,
        "cases": cases,
    }
    write_json(GOLDENS / "tokenizers.json", doc, compact=False)
    compact_lists(GOLDENS / "tokenizers.json")
    gzip_file(GOLDENS / "tokenizers.json")  # committed as tokenizers.json.gz (repo size); the plain file is removed
    log(f"  {len(cases)} prompts, {len(disagreements)} slow/fast disagreements:")
    for d in disagreements:
        log(f"    {d['tokenizer']}: {d['prompt'][:60]!r}")


def strip_pad(ids, k):
    pad = 49407 if k == "clip_l" else 0
    out = list(ids)
    while len(out) > 2 and out[-1] == pad and out[-2] == pad:
        out.pop()
    return out


def toks_of(tok, ids, k):
    return tok.convert_ids_to_tokens(strip_pad(ids, k))


def compact_lists(path: Path):
    """Indented JSON, but every list of ints on one line (keeps the file small and diffable)."""
    text = json.dumps(read_json(path), ensure_ascii=False, indent=1)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + ",".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Stage: broken
# ----------------------------------------------------------------------------------------------------------------


def graph_io(path: Path) -> tuple[list, list]:
    """(inputs, outputs) of a committed graph as ValueInfoProtos, to copy names/types/shapes from."""
    m = onnx.load(str(path), load_external_data=False)
    return list(m.graph.input), list(m.graph.output)


def save_small_model(graph, path: Path, opset=18):
    """Same opset (18) and IR version (8) as optimum's exports, so ORT loads them and only the intended defect
    remains."""
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="make_fixtures.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def stage_broken():
    """Tiny hand-built graphs for the crate's error tests. Each keeps the real tiny-sd3 signature except one
    deliberate defect; all but not_onnx.onnx are valid ONNX that ORT loads and runs."""
    from onnx import TensorProto, helper

    dst = FIXTURES / "broken"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    ins, outs = graph_io(FIXTURES / "tiny-sd3" / "transformer" / "model.onnx")

    def renamed(vi, name=None, elem_type=None, dims=None):
        t = vi.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim] if dims is None else dims
        return helper.make_tensor_value_info(name or vi.name, elem_type or t.elem_type, shape)

    # transformer_wrong_input_name.onnx: `hidden_states` renamed to `latents`; out_hidden_states = latents.
    g_ins = [renamed(ins[0], name="latents")] + [renamed(v) for v in ins[1:]]
    node = helper.make_node("Identity", ["latents"], ["out_hidden_states"])
    save_small_model(helper.make_graph([node], "transformer_wrong_input_name", g_ins, [renamed(outs[0])]),
                     dst / "transformer_wrong_input_name.onnx")

    # transformer_wrong_dtype.onnx: hidden_states is int64 (output still float: Cast).
    g_ins = [renamed(ins[0], elem_type=TensorProto.INT64)] + [renamed(v) for v in ins[1:]]
    node = helper.make_node("Cast", ["hidden_states"], ["out_hidden_states"], to=TensorProto.FLOAT)
    save_small_model(helper.make_graph([node], "transformer_wrong_dtype", g_ins, [renamed(outs[0])]),
                     dst / "transformer_wrong_dtype.onnx")

    # text_encoder_wrong_rank.onnx: input_ids of rank 1 [sequence_length]; outputs as CLIP-L's (width 8):
    # h[1, S, 8] = float(input_ids)[None, :, None] * ones(8); text_embeds = mean over S; hidden_states.i = h.
    tins, touts = graph_io(FIXTURES / "tiny-sd3" / "text_encoder" / "model.onnx")
    width = touts[1].type.tensor_type.shape.dim[2].dim_value
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_3d"]),
        helper.make_node("Mul", ["ids_3d", "ones"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axis1"], ["text_embeds"], keepdims=0),
        helper.make_node("Identity", ["h"], ["last_hidden_state"]),
    ]
    nodes += [helper.make_node("Identity", ["h"], [o.name]) for o in touts[2:]]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [0, 2]),
        helper.make_tensor("ones", TensorProto.FLOAT, [1, 1, width], [1.0] * width),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    g_in = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["sequence_length"])]
    g_out = [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, [1, width])]
    g_out += [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, [1, "sequence_length", width]) for o in touts[1:]]
    save_small_model(helper.make_graph(nodes, "text_encoder_wrong_rank", g_in, g_out, initializer=inits),
                     dst / "text_encoder_wrong_rank.onnx")

    # not_onnx.onnx: deterministic garbage (not a protobuf ModelProto).
    (dst / "not_onnx.onnx").write_bytes(b"this is not an ONNX model\n" + bytes(range(256)) * 4)

    # Smoke test: the three graphs load and run in ORT (their defect is in the signature, not the graph).
    for f, feeds in (
        ("transformer_wrong_input_name.onnx", {"latents": np.zeros((1, 16, 8, 8), np.float32)}),
        ("transformer_wrong_dtype.onnx", {"hidden_states": np.zeros((1, 16, 8, 8), np.int64)}),
        ("text_encoder_wrong_rank.onnx", {"input_ids": np.arange(77, dtype=np.int64)}),
    ):
        sess = ort.InferenceSession(str(dst / f), providers=["CPUExecutionProvider"])
        full = {i.name: feeds.get(i.name, np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32))
                for i in sess.get_inputs()}
        sess.run(None, full)
    try:
        ort.InferenceSession(str(dst / "not_onnx.onnx"), providers=["CPUExecutionProvider"])
        raise SystemExit("not_onnx.onnx loaded?")
    except Exception as e:  # noqa: BLE001 - expected: ORT refuses it
        if isinstance(e, SystemExit):
            raise
    log("  " + ", ".join(sorted(p.name for p in dst.iterdir())))


# ----------------------------------------------------------------------------------------------------------------
# Stage: readme (everything in it is computed from the committed files)
# ----------------------------------------------------------------------------------------------------------------


def signature_lines(path: Path) -> list[str]:
    from onnx import TensorProto

    m = onnx.load(str(path), load_external_data=False)

    def fmt(v):
        t = v.type.tensor_type
        dims = ", ".join(d.dim_param if d.dim_param else str(d.dim_value) for d in t.shape.dim)
        return f"`{v.name}` {TensorProto.DataType.Name(t.elem_type).lower()} [{dims}]"

    opset = ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in m.opset_import)
    lines = ["- inputs: " + "; ".join(fmt(v) for v in m.graph.input)]
    lines.append("- outputs: " + "; ".join(fmt(v) for v in m.graph.output))
    lines.append(f"- opset {opset}, IR {m.ir_version}, {len(m.graph.node)} nodes, {path.stat().st_size:,} bytes")
    return lines


def folder_size(p: Path) -> int:
    """Bytes of the files under p (not this README, which is being written, nor Python caches); a symlink counts
    as itself (its target path, as git stores it), not as the file it points to."""
    return sum(f.lstat().st_size for f in p.rglob("*")
               if (f.is_symlink() or f.is_file()) and f != FIXTURES / "README.md" and "__pycache__" not in f.parts)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def stage_readme():
    L = []
    add = L.append
    add("# Test fixtures and golden outputs")
    add("")
    add("Everything in `models/fixtures/` and `models/goldens/` is generated by `models/make_fixtures.py` (and this "
        "README by its `readme` stage): tiny random-weight Stable Diffusion 3 pipelines exported to ONNX exactly the "
        "way real checkpoints are (`optimum-cli export onnx --task text-to-image`), plus the outputs of Hugging Face "
        "diffusers (PyTorch) and optimum (ONNX Runtime) on them. No real SD3 weights are involved.")
    add("")
    add("Regenerate (deterministic, about 30 s on 2 cores once the venv exists; intermediates go to "
        "`$SD3_FIXTURE_BUILD`, default `<tmp>/sd3-onnx-fixture-build`):")
    add("")
    add("```")
    add("bash models/setup-python.sh && .venv-tools/bin/python models/make_fixtures.py")
    add("# or a subset: .venv-tools/bin/python models/make_fixtures.py --stages goldens,readme --fixtures tiny-sd35")
    add("```")
    add("")
    add("## Folders")
    add("")
    add("| folder | what |")
    add("|---|---|")
    add("| `fixtures/tiny-sd3/` | SD3-medium-like pipeline (no qk-norm, no dual attention), optimum layout: tokenizers as `tokenizer.json` only (`model_index.json` names `CLIPTokenizerFast`), `tokenizer_2/tokenizer.json` a symlink to CLIP-L's `../tokenizer/tokenizer.json` (CLIP-G's pad `!` is an added special token through `tokenizer_2/tokenizer_config.json` alone), `tokenizer_3/` without `spiece.model` |")
    add("| `fixtures/tiny-sd35/` | SD3.5-medium-like pipeline (qk RMS-norm, dual attention in blocks 0-1), the real stabilityai SD3 repo tokenizer layout: `tokenizer/`, `tokenizer_2/` = `vocab.json` + `merges.txt` + configs only (slow `CLIPTokenizer`; `tokenizer_2/`'s `vocab.json` and `merges.txt` are symlinks to the identical files in `../tokenizer/`), `tokenizer_3/` = `spiece.model` + `tokenizer.json` + configs; other VAE factors and scheduler shift than tiny-sd3 |")
    add("| `fixtures/tiny-sd3-fp16/` | only `transformer/` and `vae_decoder/` of tiny-sd3 converted to float16, float16 inputs and outputs (the timestep too); overlay it onto a copy of tiny-sd3 |")
    add("| `fixtures/broken/` | hand-built invalid graphs for error tests (see below) |")
    add("| `fixtures/export-tiny*/` | not written by this script: made by `models/export/make_export_fixtures.py` from tiny-sd3's transformer weights (via `make_fixtures.build_pipeline`) |")
    add("| `goldens/<fixture>/<case>/` | `request.json`, `latents.npy` (initial noise), `diffusers.png`, `optimum.png`; for `cfg_negative` also the debug tensors |")
    add("| `goldens/<fixture>/{no_t5,clip_skip_1,dynamic_shift,t5_512,vae_tiling}/` | option cases (stage `options`): `request.json` with `\"t5\": false` / `\"clip_skip\": 1` / `\"scheduler_config\": \"scheduler_config.json\"` (+ that file) / `\"max_sequence_length\": 512` / `\"vae_tiling\": true`, `latents.npy`, `diffusers.png`, `optimum.png` (not for `vae_tiling`: `untiled.png` instead), `summary.json` |")
    add("| `goldens/<fixture>/summary.json` | diffusers vs optimum pixel differences, pixel statistics, sensitivity table |")
    add("| `goldens/scheduler.json` | FlowMatchEulerDiscreteScheduler sigmas/timesteps for many configs |")
    add("| `goldens/tokenizers.json.gz` | input ids for a corpus of prompts, as diffusers tokenizes them, for every tokenizer flavour |")
    add("")

    # ---- dimensions
    add("## Dimensions")
    add("")
    rows = []
    cfgs = {}
    for name, spec in SPECS.items():
        f = FIXTURES / name
        te1, te2, te3 = (read_json(f / c / "config.json") for c in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        tr, vae = read_json(f / "transformer" / "config.json"), read_json(f / "vae_decoder" / "config.json")
        sch = read_json(f / "scheduler" / "scheduler_config.json")
        cfgs[name] = (te1, te2, te3, tr, vae, sch)
    names = list(SPECS)
    def row(label, fn):
        rows.append([label] + [fn(*cfgs[n]) for n in names])
    clip = lambda c: f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, ffn {c['intermediate_size']}, proj {c['projection_dim']}, {c['hidden_act']}, vocab {c['vocab_size']}, eos_token_id {c['eos_token_id']}"  # noqa: E731
    row("CLIP-L (`text_encoder`)", lambda a, b, c, d, e, f: clip(a))
    row("CLIP-G (`text_encoder_2`)", lambda a, b, c, d, e, f: clip(b))
    row("T5 (`text_encoder_3`)", lambda a, b, c, d, e, f: f"d_model {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads x d_kv {c['d_kv']}, d_ff {c['d_ff']} ({c['feed_forward_proj']}), vocab {c['vocab_size']} (tokenizer 1100)")
    row("transformer", lambda a, b, c, d, e, f: f"{d['num_layers']} layers, {d['num_attention_heads']} heads x {d['attention_head_dim']} (inner {d['num_attention_heads'] * d['attention_head_dim']}), joint_attention_dim {d['joint_attention_dim']}, caption_projection_dim {d['caption_projection_dim']}, pooled_projection_dim {d['pooled_projection_dim']}, qk_norm {d['qk_norm']}, dual_attention_layers {d['dual_attention_layers']}")
    row("transformer patching", lambda a, b, c, d, e, f: f"in/out channels {d['in_channels']}/{d['out_channels']}, patch {d['patch_size']}, sample_size {d['sample_size']} (default image {d['sample_size'] * 8} px), pos_embed_max_size {d['pos_embed_max_size']} (up to {d['pos_embed_max_size'] * d['patch_size'] * 8} px)")
    row("VAE", lambda a, b, c, d, e, f: f"block_out_channels {e['block_out_channels']} (factor {2 ** (len(e['block_out_channels']) - 1)}), {e['layers_per_block']} layer/block, groups {e['norm_num_groups']}, latent_channels {e['latent_channels']}, quant convs {e['use_quant_conv']}/{e['use_post_quant_conv']}")
    row("VAE factors", lambda a, b, c, d, e, f: f"scaling_factor {e['scaling_factor']}, shift_factor {e['shift_factor']}")
    row("scheduler", lambda a, b, c, d, e, f: f"FlowMatchEulerDiscrete shift {f['shift']}, use_dynamic_shifting {f['use_dynamic_shifting']}")
    rows.append(["init gains (see `informative_init`)"] + [", ".join(f"{k} {v}" for k, v in SPECS[n].init.items()) for n in names])
    L.extend(md_table(["", *names], rows))
    add("")
    add("Context width: CLIP-L + CLIP-G hidden widths are zero-padded to the T5 width (tiny-sd3: 8 + 12 -> 32, "
        "tiny-sd35: 10 + 14 -> 40); pooled = CLIP-L proj ++ CLIP-G proj (8 + 12 = 20, 6 + 16 = 22). tiny-sd35 has "
        "projection dims different from hidden dims on purpose.")
    add("")

    # ---- signatures
    add("## Graph signatures")
    add("")
    add("Read from the committed files. Symbolic dims are optimum's names; note two quirks: CLIP's `text_embeds` "
        "second dim is *named* `sequence_length` but is the projection width at run time, and the transformer's "
        "`timestep` is a float32 vector `[step]` (one value per batch row, the value is sigma*1000, i.e. 0..1000) - "
        "float16 in the fp16 fixture.")
    add("")
    for name in (*SPECS, "tiny-sd3-fp16"):
        add(f"### {name}")
        add("")
        for comp in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder"):
            path = FIXTURES / name / comp / "model.onnx"
            if path.exists():
                add(f"`{comp}/model.onnx`")
                add("")
                L.extend(signature_lines(path))
                add("")
    add("CLIP outputs: `hidden_states.0` is the embedding output, `hidden_states.i` the output of layer i (before the "
        "final layer norm); `last_hidden_state` is `final_layer_norm(hidden_states.L)`. SD3 uses "
        "`hidden_states.(L-1)` (diffusers `hidden_states[-2]`; optimum's Python wrapper rebuilds the list as "
        "`hidden_states.0..L-1` + `last_hidden_state`, so `[-2]` is the same tensor) and `text_embeds` as pooled. "
        "The CLIP graphs pool at the first `49407` in `input_ids` (ArgMax of `input_ids == eos_token_id`).")
    add("")

    # ---- goldens
    add("## Golden cases")
    add("")
    rows = [[c.name, c.prompt if len(c.prompt) < 60 else c.prompt[:57] + "...", c.negative_prompt, f"{c.width}x{c.height}",
             c.steps, c.guidance, c.max_sequence_length, c.latent_seed] for c in CASES]
    L.extend(md_table(["case", "prompt", "negative", "WxH", "steps", "guidance", "max_sequence_length", "latent seed"], rows))
    add("")
    add("`latents.npy` = `torch.randn((1, 16, H/8, W/8), generator=torch.Generator('cpu').manual_seed(seed))`, "
        "float32. `diffusers.png`: `StableDiffusion3Pipeline` (PyTorch fp32 CPU, 1 thread) with `latents=`; "
        "`optimum.png`: `ORTStableDiffusion3Pipeline.from_pretrained(<fixture folder>)` (ORT CPU, 1 thread), same "
        "latents. Debug tensors (cfg_negative only, float32): `prompt_embeds` / `negative_prompt_embeds` "
        "[1, 77+max_sequence_length, T5 width], `pooled_prompt_embeds` / `negative_pooled_prompt_embeds` "
        "[1, pooled], `final_latents` [1, 16, h, w] (after the last step, before `/ scaling_factor + "
        "shift_factor`), `sigmas` [steps+1], `timesteps` [steps] (what the transformer is fed), and "
        "`optimum_final_latents.npy`, optimum's final latents, which the numpy-ORT reference below reproduces bit "
        "for bit. ORT vs PyTorch on these: prompt embeddings differ by up to ~2e-5, final latents by up to ~3e-5. "
        "`optimum_final_latents_2026-12-02.npy`: the same made on another development machine, 1.1e-5 away (ONNX "
        "Runtime's CPU kernels depend on the instruction set; see docs/diffusers-versions.md).")
    add("")
    add("Pixel differences (0..255) per case: diffusers vs optimum, and a plain numpy + ONNX Runtime "
        "re-implementation of the pipeline (`OrtReference` in make_fixtures.py, f32 host math as docs/design.md "
        "describes) vs optimum:")
    add("")
    rows = []
    for name in SPECS:
        sm = read_json(GOLDENS / name / "summary.json")
        for cname, c in sm["cases"].items():
            d, r, px = c["diffusers_vs_optimum"], c["numpy_ort_reference_vs_optimum"], c["diffusers_pixels"]
            rows.append([name, cname, f"{d['max_abs']} / {d['mean_abs']} ({d['pixels_differing']} px)",
                         f"{r['max_abs']} / {r['mean_abs']}",
                         f"mean {px['mean']}, std {px['std']}, {px['frac_0'] * 100:.1f}% at 0, {px['frac_255'] * 100:.1f}% at 255"])
    L.extend(md_table(["fixture", "case", "diffusers vs optimum max / mean", "numpy-ORT ref vs optimum max / mean", "diffusers image"], rows))
    add("")
    add("Option cases (stage `options`; request.json records the option, tests/golden_options.rs runs them): "
        "`no_t5` is diffusers with `text_encoder_3=None, tokenizer_3=None` (zeros [1, max_sequence_length, "
        "joint_attention_dim] replace the T5 states, as since diffusers 0.36; no optimum.png); `no_t5_clip_length` "
        "the same with 77 zero tokens (diffusers <= 0.35: diffusers with max_sequence_length=77, and optimum on a "
        "copy of the fixture without `text_encoder_3/` and `tokenizer_3/`); `no_t5_omit` the CLIP tokens alone "
        "(ComfyUI; diffusers with prompt_embeds cut to 77 tokens); `clip_skip_1` is `clip_skip=1` (`hidden_states[-3]` of both CLIP "
        "encoders), which diffusers (0.35.2 to 0.42.1) applies to the positive prompt only; `dynamic_shift` is the fixture's "
        "scheduler config with `use_dynamic_shifting: true` (and base/max image_seq_len 16/64, base/max shift "
        "1.5/4.5: mu = 2.0 at 96x64, 24 image tokens) in diffusers' scheduler and in optimum's copy of the "
        "fixture; `t5_512` is `max_sequence_length=512` with a prompt of 370 T5 tokens (256 would truncate it); "
        "`vae_tiling` is diffusers with `pipe.vae.enable_tiling()` at 128x96 (tiles of 64 px / 8 latents, 25% "
        "overlap, tiled both ways; optimum has no VAE tiling, so no optimum.png, and `untiled.png` is the same "
        "request without tiling). Max / mean pixel differences:")
    add("")
    rows = []
    for name in SPECS:
        for c, options in OPTION_CASES:
            sm = read_json(GOLDENS / name / c.name / "summary.json")
            d, w = sm.get("diffusers_vs_optimum"), sm["diffusers_vs_diffusers_without_option"]
            n = sm.get("diffusers_vs_clip_skip_on_negative_too")
            prompt = c.prompt if len(c.prompt) <= 80 else f"{c.prompt[:60]}... ({len(c.prompt)} characters)"
            rows.append([name, c.name, json.dumps(options), prompt, c.negative_prompt, c.latent_seed,
                         f"{d['max_abs']} / {d['mean_abs']}" if d else "- (no optimum)",
                         f"{w['max_abs']} / {w['mean_abs']}",
                         f"{n['max_abs']} / {n['mean_abs']}" if n else "-"])
    L.extend(md_table(["fixture", "case", "options", "prompt", "negative", "latent seed", "diffusers vs optimum",
                       "diffusers vs same request without the option", "clip_skip on the negative prompt too"], rows))
    add("")
    fp = read_json(GOLDENS / "tiny-sd3-fp16" / "summary.json")["cases"]["cfg_negative"]
    add("tiny-sd3-fp16 (`goldens/tiny-sd3-fp16/cfg_negative/`): `optimum.png` is optimum's pipeline on the overlay "
        "(it rounds the latents to float16 after every step and does CFG and the VAE scaling in float16, see "
        "`request.json`), `ort_f32_host.png` the numpy-ORT reference with float32 host math and float16 only at the "
        f"graph boundary. optimum vs ort_f32_host: max {fp['optimum_vs_ort_f32_host']['max_abs']}, mean "
        f"{fp['optimum_vs_ort_f32_host']['mean_abs']}; fp16 optimum vs fp32 optimum: max "
        f"{fp['optimum_vs_fp32_optimum']['max_abs']}, mean {fp['optimum_vs_fp32_optimum']['mean_abs']}.")
    add("")

    # ---- sensitivity
    add("## Sensitivity table")
    add("")
    add("Would a test comparing against the goldens at a 1/255 tolerance catch typical mistakes? Each row injects one "
        "mistake into the diffusers reference and reports the max abs pixel difference to the golden, per case "
        "(cfg_negative, long_prompt, guidance_1, non_square). Caught = some case differs by more than 3. "
        "`make_fixtures.py` fails if one of (a)-(e) is not caught.")
    add("")
    for name in SPECS:
        sm = read_json(GOLDENS / name / "summary.json")
        rows = [[f"({r['id']})", r["mistake"], *r["max_abs"].values(), "yes" if r["caught"] else "**no**"] for r in sm["sensitivity"]]
        add(f"{name}:")
        add("")
        L.extend(md_table(["", "mistake", *[c.name for c in CASES], "caught"], rows))
        add("")
    add("One pad fewer in T5 (d1) removes one of ~240 near-identical pad tokens from a 333-token context: its effect "
        "is ~1/240 and only the `long_prompt` golden (max_sequence_length 32: its empty negative prompt has 31 pads) "
        "shows it clearly. A test suite that checks every golden catches it.")
    add("")

    # ---- scheduler/tokenizers
    add("## scheduler.json and tokenizers.json.gz")
    add("")
    sj = read_json(GOLDENS / "scheduler.json")
    add(f"`scheduler.json`: {len(sj['cases'])} cases (steps 1, 2, 4, 8, 28, 50 x shift 1.0, 3.0, 2.5, 5.0, plus "
        "dynamic shifting with mu from 64/512/1024 px and one linear time shift). Notes inside the file:")
    add("")
    for n in sj["notes"]:
        add(f"- {n}")
    add("")
    tj = read_json(GOLDENS / "tokenizers.json.gz")
    add(f"`tokenizers.json.gz` (gzipped JSON): {len(tj['cases'])} prompts. For each: CLIP-L/CLIP-G ids (77, padded), untruncated ids and "
        "the text diffusers logs as removed; T5 ids for max_sequence_length 256 and 77. Flavours: `tiny-sd3` (fast, "
        "tokenizer.json), `tiny-sd35` (slow CLIPTokenizer from vocab/merges - what diffusers loads for the real SD3 "
        "repo), `tiny-sd35-fast` (CLIPTokenizerFast converted from the same vocab/merges; equals tiny-sd3). "
        "Where slow and fast disagree:")
    add("")
    seen = []
    for d in tj["disagreements"]:
        key = (d["prompt"], d["tokenizer"] if d["tokenizer"] == "t5" else "clip")
        if key in seen:
            continue
        seen.append(key)
        add(f"- {key[1]}: `{d['prompt']!r}`")
    add("")
    add("Causes: the slow CLIPTokenizer runs `ftfy.fix_text` (ftfy is installed): it unescapes HTML entities "
        "(`&amp;` -> `&`), uncurls quotes (then `'single'` splits as the contraction `'s`), expands ligatures and "
        "width forms (NFKC-like), repairs mojibake; it also lowercases before matching special tokens, so "
        "`<|ENDOFTEXT|>` becomes id 49407. The fast tokenizer (`tokenizer.json`: NFC, whitespace collapse, "
        "lowercase) byte-encodes all of those. T5: sentencepiece and `tokenizer.json` break unigram ties differently "
        "for `...`/`…`, and the slow T5Tokenizer does not add a second `</s>` after a literal `</s>`. CLIP-G's pad "
        "`!` is an added special token in both: every `!` in a prompt becomes id 0 for CLIP-G, never merged.")
    add("")

    # ---- broken
    add("## Broken graphs (`fixtures/broken/`)")
    add("")
    add("| file | defect |")
    add("|---|---|")
    add("| `transformer_wrong_input_name.onnx` | tiny-sd3 transformer signature with `hidden_states` renamed to `latents` (Identity to `out_hidden_states`) |")
    add("| `transformer_wrong_dtype.onnx` | tiny-sd3 transformer signature with `hidden_states` int64 (Cast to the float output) |")
    add("| `text_encoder_wrong_rank.onnx` | CLIP-L output names (width 8) but `input_ids` int64 of rank 1 `[sequence_length]`, outputs `[1, ...]` |")
    add("| `not_onnx.onnx` | 1050 bytes of text + binary garbage, not a protobuf |")
    add("")
    add("The three graphs are valid ONNX (opset 18, IR 8) that ORT loads and runs; only their signature is wrong.")
    add("")

    # ---- other generators
    add("## Files from the other generators")
    add("")
    add("| files | generator | what |")
    add("|---|---|---|")
    add("| `goldens/<fixture>/{img2img,inpaint,sampler_heun,sampler_dpmpp_2m}`, `goldens/tiny-sd35/slg` | "
        "`models/make_feature_goldens.py` | diffusers' img2img and inpaint pipelines from a seed alone (every draw), "
        "Heun and DPM-Solver++ (2M) schedulers, skip-layer guidance; debug tensors and a sensitivity table in each "
        "summary.json |")
    add("| `goldens/samplers.json` | `models/make_sampler_goldens.py` | Heun / DPM++ 2M timesteps, sigmas and "
        "step-by-step trajectories on a closed-form fake model |")
    add("| `goldens/torch_randn/` | `models/make_rng_goldens.py` | `torch.randn` draws from seeded CPU generators, "
        "for the bit-exact noise test |")
    add("| `fixtures/controlnet/`, `goldens/controlnet/tiny-sd3/` | `models/make_controlnet_fixtures.py` | tiny "
        "random SD3 ControlNets of both kinds (InstantX-style and SD3.5), tiny-sd3's transformer with a residual "
        "input (`transformer/model_controlnet.onnx`), diffusers' ControlNet pipeline images (VAE posterior mean) and "
        "sabotaged variants (docs/controlnet.md) |")
    add("| `goldens/canny/` | `models/make_canny_goldens.py` | `cv2.Canny` edges of three test images at three "
        "threshold pairs |")
    add("| `fixtures/tiny-sd35/transformer/model_skip_layers.onnx` | `models/export/make_skip_fixture.py` | the "
        "fixture's transformer with block 1 skipped (`skip_layers` metadata `[1]`), for skip-layer guidance |")
    add("")

    # ---- numerics/quirks
    add(f"## Behaviour worth knowing (diffusers {DIFFUSERS} for diffusers.png; optimum 2.1.0 / optimum-onnx 0.1.0 on "
        "diffusers 0.35.2 for optimum.png, ORT 1.31.1; docs/diffusers-versions.md)")
    add("")
    for line in QUIRKS:
        add(f"- {line}")
    add("")

    # ---- determinism & sizes
    add("## Determinism")
    add("")
    add(DETERMINISM_NOTE)
    add("")
    add("## Sizes")
    add("")
    rows = [[f"`{p.relative_to(MODELS)}`", f"{folder_size(p) / 1e6:.2f} MB"] for p in sorted(list(FIXTURES.iterdir()) + list(GOLDENS.iterdir())) if p.is_dir()]
    rows.append(["`goldens/*.json`", f"{sum(f.stat().st_size for f in GOLDENS.glob('*.json')) / 1e6:.2f} MB"])
    total = folder_size(MODELS)
    rows.append(["**all of models/** (every file, models/export included, without this README)", f"**{total / 1e6:.2f} MB**"])
    L.extend(md_table(["path", "size"], rows))
    add("")
    add("The CLIP token embedding tables (49408 rows) dominate: keep CLIP widths tiny.")
    (FIXTURES / "README.md").write_text("\n".join(L) + "\n", encoding="utf-8")
    log(f"  models/ total {total / 1e6:.2f} MB")


QUIRKS = [
    "The transformer's `timestep` input is float (sigma*1000, not an integer index) with shape `[batch]`; diffusers "
    "feeds `t.expand(batch)` and optimum casts it to the graph's element type: float16 in the fp16 fixture, where "
    "tiny-sd3's cfg_negative timesteps 1000, 857.6923, 602.1506, 8.928572 become 1000, 857.5, 602, 8.93.",
    "CFG is `noise_pred_uncond + g * (noise_pred_text - noise_pred_uncond)` with the batch ordered "
    "[negative, positive]; it is enabled only when guidance_scale > 1 (guidance 1.0 runs batch 1 and ignores the "
    "negative prompt).",
    "A missing negative prompt is the empty string `\"\"`, which is still encoded (CLIP: `<|startoftext|> "
    "<|endoftext|>` + pads, T5: `</s>` + pads).",
    "diffusers logs the T5 'removed text' with the CLIP length: `untruncated_ids[:, 77 - 1 : -1]`, whatever "
    "max_sequence_length is (tokenizers.json.gz has it verbatim plus the really truncated text).",
    "FlowMatchEulerDiscreteScheduler computes sigma_min in float32 but the timestep linspace and the shift in float64, "
    "then casts to float32; timesteps = sigmas_f32 * 1000 (float32). The Euler step upcasts the sample to float32 and "
    "casts the result back to the model output's dtype (so with a float16 transformer optimum keeps float16 latents).",
    "VaeImageProcessor.postprocess: `(x / 2 + 0.5).clamp(0, 1)`, then `(x * 255).round()` in numpy, which rounds "
    "halves to even (Rust's `f32::round` rounds them away from zero; they differ only on exact .5).",
    "optimum's ORTTextEncoder maps `hidden_states.0..L-1` + `last_hidden_state` to the `hidden_states` tuple, "
    "dropping `hidden_states.L`; `[-2]` is `hidden_states.(L-1)` either way.",
    "optimum reads `scaling_factor`/`shift_factor` from `vae_decoder/config.json` (the pipeline's `vae.config`).",
    "The exported CLIP graphs pool at the first position where `input_ids == 49407` (because the configs say "
    "eos_token_id 49407); the real SD3 configs say 2, for which transformers pools at `argmax(input_ids)` - the same "
    "position for every tokenizer output.",
    "A literal `<|endoftext|>` in a prompt is an added special token for every CLIP flavour: it becomes 49407 "
    "mid-sequence, and the CLIP graphs then pool at that first occurrence.",
    "The T5 tokenizer has no `<s>`; `</s>` (1) is appended by the post-processor; pad is 0. The T5 graph takes no "
    "attention mask (pads are attended to), so the padding length changes the result.",
    "transformers 4.57 converts a fresh spiece.model to tokenizer.json with `Metaspace(prepend_scheme=\"never\")` "
    "unless `add_prefix_space=True` is passed (then \"always\", like google/t5-v1_1-xxl); the generator passes it and "
    "removes the key from tokenizer_config.json afterwards, because with it T5TokenizerFast re-converts from "
    "spiece.model on every load (and fails where only tokenizer.json ships).",
    "`onnxruntime.transformers.float16.convert_float_to_float16` emits the Cast nodes it adds for Resize's float32 "
    "`scales` after their consumer; ORT accepts that, `onnx.checker` does not, so the generator re-sorts the nodes.",
]

DETERMINISM_NOTE = (
    "Every random draw is seeded: each network is created right after `torch.manual_seed(seed*100 + k)`, the T5 "
    "training text comes from `random.Random(1234)`, latents from `torch.Generator('cpu').manual_seed(case seed)`. "
    "PyTorch and ONNX Runtime run single-threaded, sentencepiece trains with one thread. Running the generator twice "
    "on the same machine, with different build folders and in a fresh `.venv-tools` from `setup-python.sh`, gave "
    "byte-identical files (sha256 over every generated file). The ONNX files come from "
    "torch.onnx (TorchScript exporter) via optimum and contain no timestamps or paths; `_name_or_path` in the configs "
    "is rewritten to a build-folder-independent value. Other CPUs or library versions may change the float results "
    "in the last bits, which can move a golden pixel by 1."
)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

ALL_STAGES = ["tokenizers", "models", "goldens", "options", "fp16", "scheduler", "tokjson", "broken", "readme"]
# Not in the default run: `checkpoints` (the `models` stage without the export, so without touching the committed
# fixtures) and `fp16-golden` (the `fp16` stage without re-converting the committed float16 graphs).
EXTRA_STAGES = ["checkpoints", "fp16-golden"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(ALL_STAGES), help="comma-separated subset of: " + ",".join(ALL_STAGES))
    ap.add_argument("--fixtures", default=",".join(SPECS), help="comma-separated subset of: " + ",".join(SPECS))
    ap.add_argument("--option-cases", default="", help="options stage: comma-separated subset of: "
                    + ",".join(c.name for c, _ in OPTION_CASES) + " (default all)")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    names = [n for n in args.fixtures.split(",") if n]
    for s in stages:
        if s not in ALL_STAGES + EXTRA_STAGES:
            raise SystemExit(f"unknown stage {s}")
    BUILD.mkdir(parents=True, exist_ok=True)
    log(f"build folder: {BUILD}")
    if "tokenizers" in stages:
        log("[tokenizers]")
        stage_tokenizers()
    if "models" in stages:
        stage_models(names)
    if "checkpoints" in stages:
        stage_checkpoints(names)
    if "goldens" in stages:
        stage_goldens(names)
    if "options" in stages:
        stage_options(names, [c for c in args.option_cases.split(",") if c] or None)
    for s, fn in (("fp16", stage_fp16), ("fp16-golden", lambda: stage_fp16(convert=False)),
                  ("scheduler", stage_scheduler), ("tokjson", stage_tokjson),
                  ("broken", stage_broken), ("readme", stage_readme)):
        if s in stages:
            log(f"[{s}]")
            fn()
    log("done")


if __name__ == "__main__":
    main()
