#!/usr/bin/env python3
"""LoRA goldens for tests/lora.rs: random PEFT LoRAs on the tiny-sd3 transformer and diffusers' images with them.

    PYTHONPATH=<peft site> python models/make_lora_goldens.py      # pins: models/reference-requirements.txt

Needs the PyTorch checkpoint of tiny-sd3 that `make_fixtures.py --stages models` leaves in its build folder
($SD3_FIXTURE_BUILD or <tmp>/sd3-onnx-fixture-build/tiny-sd3-diffusers): the weights the committed ONNX graphs were
exported from. tests/lora.rs checks that the crate's image without LoRA equals diffusers' `base.png` within 1
level, which is what ties the two together.

Writes models/goldens/lora/tiny-sd3/:
  one.safetensors, two.safetensors  LoRAs made with peft (`LoraConfig(init_lora_weights=False)`, then A and B
                                    redrawn from seeded normals, so both are non-zero): rank 4, lora_alpha 2 (one) and
                                    rank 2, lora_alpha 3 (two), on every attention projection and feed-forward layer
                                    of the transformer; saved with `StableDiffusion3Pipeline.save_lora_weights`
                                    (diffusers/PEFT keys `transformer.<module>.lora_A.weight`, alpha in the
                                    `lora_adapter_metadata` of the safetensors header).
  swapped.safetensors               `one` with the image-stream and context-stream projections exchanged
                                    (to_q <-> add_q_proj, ..., ff <-> ff_context): a LoRA on the wrong stream.
  base.png                          no LoRA
  one_0.8.png                       load_lora_weights(one) + set_adapters(["one"], [0.8])
  one_0.8_two_-0.6.png              both, set_adapters(["one", "two"], [0.8, -0.6])
  one_0.png                         set_adapters(["one"], [0.0]) (equals base.png)
  te.safetensors                    a LoRA on both CLIP text encoders (q/k/v/out_proj, fc1, fc2; rank 4, lora_alpha 6),
                                    keys `text_encoder.` / `text_encoder_2.`
  te_0.9.png                        te at scale 0.9, applied by peft to the CLIPs (see `with_te_lora`: diffusers'
                                    text-encoder loading needs a peft that this environment cannot have)
  kohya.safetensors                 a random LoRA in the kohya / sd-scripts layout (fused qkv, `alpha` tensors; rank 4,
                                    alpha 8; plus an adaLN key and a `lora_te1_` key that are not converted)
  kohya_peft.safetensors            it converted by models/export/kohya_to_peft.py
  kohya_0.7.png                     load_lora_weights(kohya_peft) + set_adapters(["kohya"], [0.7])
  summary.json                      the request, and pixel distances between these images
The request is models/goldens/tiny-sd3/cfg_negative (its latents.npy).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from diffusers import StableDiffusion3Pipeline
from PIL import Image

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT / "fixtures" / "tiny-sd3"
CASE = ROOT / "goldens" / "tiny-sd3" / "cfg_negative"
OUT = ROOT / "goldens" / "lora" / "tiny-sd3"
BUILD = Path(os.environ.get("SD3_FIXTURE_BUILD", Path(tempfile.gettempdir()) / "sd3-onnx-fixture-build"))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SWAP = {"attn.to_q.": "attn.add_q_proj.", "attn.to_k.": "attn.add_k_proj.", "attn.to_v.": "attn.add_v_proj.",
        "attn.to_out.0.": "attn.to_add_out.", ".ff.": ".ff_context."}


def load_pipeline() -> StableDiffusion3Pipeline:
    index = json.loads((FIXTURE / "model_index.json").read_text())
    toks = {sub: getattr(transformers, index[sub][1]).from_pretrained(FIXTURE / sub)
            for sub in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(BUILD / "tiny-sd3-diffusers"), torch_dtype=torch.float32, **toks)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(pipe, name: str, rank: int, alpha: float, seed: int, std_a: float, std_b: float) -> Path:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    tr = pipe.transformer
    tr.add_adapter(cfg, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, mod in tr.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
                a.copy_(torch.randn(a.shape, generator=g) * std_a)
                b.copy_(torch.randn(b.shape, generator=g) * std_b)
    sd = get_peft_model_state_dict(tr, adapter_name=name)
    tr.delete_adapters(name)
    meta = cfg.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    StableDiffusion3Pipeline.save_lora_weights(OUT, transformer_lora_layers=sd, weight_name=f"{name}.safetensors",
                                               transformer_lora_adapter_metadata=meta)
    return OUT / f"{name}.safetensors"


def run(pipe) -> np.ndarray:
    req = json.loads((CASE / "request.json").read_text())
    latents = torch.from_numpy(np.load(CASE / req["latents"]))
    torch.manual_seed(0)
    img = pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"] or None, width=req["width"],
               height=req["height"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
               max_sequence_length=req["max_sequence_length"], latents=latents.clone()).images[0]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def make_te_lora(pipe, name: str, rank: int, alpha: float, seed: int, std: float) -> Path:
    """A random LoRA on both CLIP text encoders (attention projections and MLP), saved with its configs in
    diffusers' layout (keys `text_encoder.` / `text_encoder_2.`, metadata `text_encoder.lora_alpha`, ...)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS, init_lora_weights=False)
    g = torch.Generator().manual_seed(seed)
    layers, metas = {}, {}
    for key, te in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        te = inject_adapter_in_model(cfg, copy.deepcopy(te), adapter_name=name)
        with torch.no_grad():
            for _, mod in te.named_modules():
                if hasattr(mod, "lora_A") and name in mod.lora_A:
                    for w in (mod.lora_A[name].weight, mod.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=g) * std)
        layers[key] = get_peft_model_state_dict(te, adapter_name=name)
        meta = cfg.to_dict()
        metas[key] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    StableDiffusion3Pipeline.save_lora_weights(
        OUT, text_encoder_lora_layers=layers["text_encoder"], text_encoder_2_lora_layers=layers["text_encoder_2"],
        text_encoder_lora_adapter_metadata=metas["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metas["text_encoder_2"], weight_name=f"{name}.safetensors")
    return OUT / f"{name}.safetensors"


def with_te_lora(pipe, path: Path, scale: float):
    """The pipeline with the text-encoder LoRA of `path` applied at `scale` by peft itself: diffusers'
    `load_lora_weights` loads text-encoder adapters through transformers' `load_adapter`, which in transformers
    5.24 requires peft >= 0.22 (not on PyPI when this was written; 0.21.2 is the latest). So the file is read back,
    its `text_encoder.` / `text_encoder_2.` weights injected with `inject_adapter_in_model` +
    `set_peft_model_state_dict` into copies of the CLIPs, and `LoraLayer.set_scale(name, scale)` applied, which is
    what `set_adapters([name], [scale])` does to each LoRA layer (scaling = scale * lora_alpha / r)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    patched = copy.copy(pipe)
    for key in ("text_encoder", "text_encoder_2"):
        conf = {k.split(".", 1)[1]: v for k, v in meta.items() if k.split(".", 1)[0] == key}
        cfg = LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"], target_modules=conf["target_modules"])
        te = inject_adapter_in_model(cfg, copy.deepcopy(getattr(pipe, key)), adapter_name="te")
        sd = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
        result = set_peft_model_state_dict(te, sd, adapter_name="te")
        assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
        for mod in te.modules():
            if isinstance(mod, LoraLayer):
                mod.set_scale("te", scale)
        setattr(patched, key, te.eval())
    return patched


def make_kohya(seed: int, rank=4, alpha=8.0) -> Path:
    """A random kohya SD3 LoRA for the tiny transformer (shapes from its config)."""
    from safetensors.numpy import save_file

    cfg = json.loads((FIXTURE / "transformer" / "config.json").read_text())
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ff = 4 * hidden
    rng = np.random.default_rng(seed)
    st = {}

    def add(name, out_f, in_f):
        st[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, in_f)) * 0.1).astype(np.float32)
        st[f"{name}.lora_up.weight"] = (rng.standard_normal((out_f, rank)) * 0.1).astype(np.float32)
        st[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)

    for n in range(cfg["num_layers"]):
        last = n == cfg["num_layers"] - 1  # context_pre_only: the context stream has only its qkv
        add(f"lora_unet_joint_blocks_{n}_x_block_attn_qkv", 3 * hidden, hidden)
        add(f"lora_unet_joint_blocks_{n}_x_block_attn_proj", hidden, hidden)
        add(f"lora_unet_joint_blocks_{n}_x_block_mlp_fc1", ff, hidden)
        add(f"lora_unet_joint_blocks_{n}_x_block_mlp_fc2", hidden, ff)
        add(f"lora_unet_joint_blocks_{n}_context_block_attn_qkv", 3 * hidden, hidden)
        if not last:
            add(f"lora_unet_joint_blocks_{n}_context_block_attn_proj", hidden, hidden)
            add(f"lora_unet_joint_blocks_{n}_context_block_mlp_fc1", ff, hidden)
            add(f"lora_unet_joint_blocks_{n}_context_block_mlp_fc2", hidden, ff)
    add("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1", 6 * hidden, hidden)
    add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 16, 16)
    path = OUT / "kohya.safetensors"
    save_file(st, str(path))
    return path


def save(a: np.ndarray, name: str):
    Image.fromarray(a).save(OUT / name)


def diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def main():
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    pipe = load_pipeline()
    one = make_lora(pipe, "one", rank=4, alpha=2.0, seed=1, std_a=0.1, std_b=0.1)
    two = make_lora(pipe, "two", rank=2, alpha=3.0, seed=2, std_a=0.1, std_b=0.1)
    te = make_te_lora(pipe, "te", rank=4, alpha=6.0, seed=4, std=0.1)
    # The wrong-stream LoRA: `one` with the two streams' keys exchanged (only modules both blocks have).
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(one), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    swapped = {}
    for k, v in tensors.items():
        nk = k
        for x, y in SWAP.items():
            if x in k:
                nk = k.replace(x, y)
            elif y in k:
                nk = k.replace(y, x)
        swapped[nk] = v
    # The last block has no context-stream output projection / ff: drop what has nowhere to go.
    names = {n for n, _ in pipe.transformer.named_modules()}
    swapped = {k: v for k, v in swapped.items() if k.removeprefix("transformer.").rsplit(".lora_", 1)[0] in names}
    save_file(swapped, str(OUT / "swapped.safetensors"), metadata=meta)

    images = {"base.png": run(pipe)}
    pipe.load_lora_weights(str(one), adapter_name="one")
    pipe.set_adapters(["one"], [0.8])
    images["one_0.8.png"] = run(pipe)
    pipe.set_adapters(["one"], [0.0])
    images["one_0.png"] = run(pipe)
    pipe.load_lora_weights(str(two), adapter_name="two")
    pipe.set_adapters(["one", "two"], [0.8, -0.6])
    images["one_0.8_two_-0.6.png"] = run(pipe)
    pipe.delete_adapters(["one", "two"])
    pipe.load_lora_weights(str(OUT / "swapped.safetensors"), adapter_name="swapped")
    pipe.set_adapters(["swapped"], [0.8])
    swapped_img = run(pipe)
    pipe.delete_adapters(["swapped"])
    # kohya: converted by the documented script, then loaded by diffusers.
    import subprocess
    import sys

    kohya = make_kohya(seed=3)
    subprocess.run([sys.executable, str(ROOT / "export" / "kohya_to_peft.py"), str(kohya),
                    str(OUT / "kohya_peft.safetensors")], check=True)
    pipe.load_lora_weights(str(OUT / "kohya_peft.safetensors"), adapter_name="kohya")
    pipe.set_adapters(["kohya"], [0.7])
    images["kohya_0.7.png"] = run(pipe)
    pipe.delete_adapters(["kohya"])
    images["te_0.9.png"] = run(with_te_lora(pipe, te, 0.9))
    assert diff(run(pipe), images["base.png"]) == 0  # the pipeline itself was left as it was
    for name, a in images.items():
        save(a, name)
    summary = {
        "case": "models/goldens/tiny-sd3/cfg_negative",
        "max_diff_levels": {
            "one_0.8 vs base": diff(images["one_0.8.png"], images["base.png"]),
            "one_0 vs base": diff(images["one_0.png"], images["base.png"]),
            "one_0.8_two_-0.6 vs one_0.8": diff(images["one_0.8_two_-0.6.png"], images["one_0.8.png"]),
            "swapped_0.8 vs one_0.8": diff(swapped_img, images["one_0.8.png"]),
            "kohya_0.7 vs base": diff(images["kohya_0.7.png"], images["base.png"]),
            "te_0.9 vs base": diff(images["te_0.9.png"], images["base.png"]),
        },
        "pixel_mean": {k: float(v.mean()) for k, v in images.items()},
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
