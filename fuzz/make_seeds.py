#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (Python standard library only).

Seeds are the repository's own test data (fixture prompts, config files, golden .npy files, init and mask
pictures), written to fuzz/seeds/<target>/ (not committed: this script remakes them), plus hostile inputs (huge
dimensions in an .npy or a PNG header, broken json), written to fuzz/regressions/<target>/ (committed, and
replayed by tests/fuzz_corpus.rs with the corpus). The fuzzers start from both; `cargo fuzz cmin` then keeps what
adds coverage in fuzz/corpus/<target>/ (see README.md).
"""

import gzip
import json
import os
import random
import struct
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(target, name, data):
    d = os.path.join(ROOT, "fuzz", "regressions" if name.startswith("hostile") else "seeds", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


# tokenize: [t5_len_lo, t5_len_hi, flags, prompt...]; flags & 0xf0 == 0x80 also runs the text encoders, flags & 7 picks
# clip_skip (0 = none, k = k - 1).
def tokenize():
    golden = json.loads(gzip.decompress(read("models/goldens/tokenizers.json.gz")))
    prompts = sorted({c["prompt"] for c in golden["cases"]})
    lengths = [256, 77, 512, 1, 0, 513]
    for i, p in enumerate(prompts):
        t5 = lengths[i % len(lengths)]
        flags = (0x80 if i % 4 == 0 else 0x10 * (i % 8)) | (i % 4)
        write("tokenize", f"golden-{i:02}", struct.pack("<HB", t5, flags) + p.encode("utf-8"))
    write("tokenize", "invalid-utf8", struct.pack("<HB", 256, 0x80) + b"a \xff\xfe red \xc3 cube \xed\xa0\x80")
    write("tokenize", "long-prompt", struct.pack("<HB", 77, 0x81) + ("a photo of a red cube " * 60).encode())
    write("tokenize", "nul-and-controls", struct.pack("<HB", 256, 0) + b"\x00\x01\x1b[31m\t\r\n<|endoftext|></s>")


# configs: the fixtures' json files and hostile variants.
def configs():
    for model in ["tiny-sd3", "tiny-sd35", "tiny-sd3-fp16"]:
        for rel in ["scheduler/scheduler_config.json", "transformer/config.json", "vae_decoder/config.json"]:
            path = f"models/fixtures/{model}/{rel}"
            if os.path.isfile(os.path.join(ROOT, path)):
                write("configs", f"{model}-{rel.replace('/', '-')}", read(path))
    hostile = {
        "dynamic-shift": {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096},
        "dynamic-equal-seq": {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 256},
        "linear-terminal-invert": {"time_shift_type": "linear", "use_dynamic_shifting": True, "shift_terminal": 0.02,
                                   "invert_sigmas": True},
        "huge-train-steps": {"num_train_timesteps": 1e300, "shift": 1e-300},
        "one-train-step": {"num_train_timesteps": 1, "shift": 3.0},
        "terminal-near-one": {"shift_terminal": 0.9999999999999999},
        "vae-17-blocks": {"block_out_channels": list(range(17)), "scaling_factor": 1.5},
        "vae-zero-scaling": {"block_out_channels": [8], "scaling_factor": 0},
        "transformer-huge": {"patch_size": 1048576, "sample_size": 1048576, "pos_embed_max_size": 1048576,
                             "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]},
        "karras": {"use_karras_sigmas": True},
    }
    for name, cfg in hostile.items():
        write("configs", f"hostile-{name}.json", json.dumps(cfg))
    write("configs", "deep-nesting.json", "[" * 200 + "]" * 200)
    write("configs", "not-an-object.json", "3")
    write("configs", "truncated.json", '{"shift": 3.0, "num_train_timesteps": ')


def npy_header(shape, descr="<f4", fortran=False, version=1, pad=True):
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({dims}), }}"
    if pad:
        while (10 + len(header) + 1) % 64:
            header += " "
    header += "\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1")
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(header)) + header.encode("latin-1")


# npy: small golden files and hostile headers.
def npy():
    picked = 0
    for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, "models/goldens"))):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            if f.endswith(".npy") and os.path.getsize(path) <= 4224 and picked < 8:
                rel = os.path.relpath(path, os.path.join(ROOT, "models/goldens"))
                write("npy", "golden-" + rel.replace("/", "-"), read(os.path.relpath(path, ROOT)))
                picked += 1
    write("npy", "hostile-huge-dims", npy_header((2**62, 2**62)))
    write("npy", "hostile-zero-times-huge", npy_header((0, 2**64 - 1)))
    write("npy", "hostile-dim-above-u64", npy_header((2**70, 1)) + b"\0" * 4)
    write("npy", "hostile-header-len-4g", b"\x93NUMPY\x02\x00\xff\xff\xff\xff{'descr': '<f4'")
    write("npy", "hostile-big-endian", npy_header((2,), descr=">f4") + b"\0" * 8)
    write("npy", "hostile-fortran", npy_header((1, 2), fortran=True) + b"\0" * 8)
    write("npy", "hostile-v3-scalar", npy_header((), version=3) + b"\0\0\x80\x7f")
    write("npy", "hostile-short-data", npy_header((1, 16, 8, 8)) + b"\0" * 100)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, color_type, bit_depth, rows=None, extra=b""):
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr) + extra
    if rows is not None:
        body += png_chunk(b"IDAT", zlib.compress(rows, 9))
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


# images: the golden init image and mask, small pictures of every colour type, hostile headers.
def images():
    write("images", "golden-init.png", read("models/goldens/tiny-sd3/img2img/init.png"))
    write("images", "golden-mask.png", read("models/goldens/tiny-sd3/inpaint/mask.png"))
    rng = random.Random(7)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}
    for ct, n in channels.items():
        for depth in [8, 16]:
            w, h = 5, 3
            row = lambda: b"\0" + bytes(rng.randrange(256) for _ in range(w * n * depth // 8))
            write("images", f"type{ct}-{depth}bit.png", png(w, h, ct, depth, b"".join(row() for _ in range(h))))
    palette = png_chunk(b"PLTE", bytes(range(12)))
    write("images", "palette.png", png(4, 2, 3, 8, b"\0\0\1\2\3" * 2, extra=palette))
    write("images", "gray-1bit-17x1.png", png(17, 1, 0, 1, b"\0\xaa\x55\x80"))
    write("images", "hostile-100000x100000.png", png(100000, 100000, 2, 8, b"\0" * 64))
    write("images", "hostile-16385x1.png", png(16385, 1, 0, 8, b"\0" * 16386))
    write("images", "hostile-zero-width.png", png(0, 4, 2, 8, b""))
    write("images", "hostile-truncated.png", png(64, 64, 2, 8, b"\0" * 10))
    write("images", "hostile-4000x4000-zeros.png", png(4000, 4000, 0, 8, b"\0" * (4001 * 4000)))


# request: arbitrary bytes (the fuzzer learns the layout of `FuzzRequest`); a few random starts.
def request():
    rng = random.Random(11)
    for i in range(8):
        write("request", f"random-{i}", bytes(rng.randrange(256) for _ in range(64 * (i + 1))))


if __name__ == "__main__":
    targets = {"tokenize": tokenize, "configs": configs, "npy": npy, "images": images, "request": request}
    for name in sys.argv[1:] or targets:
        targets[name]()
