#!/usr/bin/env python3
"""Writes models/fixtures/fp8/e4m3_torch.txt: torch's float8_e4m3fn conversions, the expected values of the crate's
E4M3 tests (src/runtime/kernels/fp8.rs). torch 2.8.0 (c10/util/Float8_e4m3fn.h: round to nearest even; values
beyond the largest finite value 448 become NaN, so the saturating conversion the kernels use is
`x.clamp(-448, 448).to(torch.float8_e4m3fn)`, NaN kept).

Lines:  `d CODE F32BITS`  decode: all 256 codes, the float32 bits of `code.view(float8_e4m3fn).float()`
        `e F32BITS CODE`  saturating encode of a float32: every decoded value (round trips), the midpoints of
                          neighbouring values (ties) and one float32 ulp either side, subnormals, saturation
                          (448 .. 1e30, +-inf), NaNs, and 600 random values over the whole range
        `r F32BITS CODE`  torch's own (non-saturating) cast where it differs from the saturating one

    .venv-diffusers-cn/bin/python models/export/e4m3_table.py
"""
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "models" / "fixtures" / "fp8" / "e4m3_torch.txt"


def main():
    codes = torch.arange(256, dtype=torch.uint8)
    dec = codes.view(torch.float8_e4m3fn).float()
    lines = [f"d {c:02x} {b & 0xffffffff:08x}" for c, b in zip(codes.tolist(), dec.view(torch.int32).tolist())]
    fin = sorted({v for v in dec.tolist() if v == v and v >= 0})
    mids = [(a + b) / 2 for a, b in zip(fin, fin[1:])]
    vals = [v for v in dec.tolist() if v == v] + mids
    vals += [float(np.nextafter(np.float32(m), np.float32(np.inf))) for m in mids]
    vals += [float(np.nextafter(np.float32(m), np.float32(-np.inf))) for m in mids]
    vals += [2.0 ** -10, 2.0 ** -10 * 1.0001, 2.0 ** -11, 2.0 ** -12, 1e-30, 1e-45, 3 * 2.0 ** -11, 0.00048828125]
    vals += [448.0, 449.0, 463.99, 464.0, 464.01, 479.0, 480.0, 500.0, 1000.0, 65504.0, 1e30, float("inf")]
    rng = np.random.default_rng(19)
    vals += (rng.standard_normal(300) * 50).tolist()
    vals += (np.exp(rng.uniform(-12, 7, 300)) * rng.choice([-1, 1], 300)).tolist()
    vals += [-v for v in vals]
    x = torch.tensor(vals, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([float("nan")]), -torch.tensor([float("nan")])])
    bits = x.view(torch.int32).tolist()
    sat = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    raw = x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    lines += [f"e {b & 0xffffffff:08x} {c:02x}" for b, c in zip(bits, sat)]
    # torch's own cast differs from the saturating one only beyond 448 (NaN there): the differing inputs, for the record
    lines += [f"r {b & 0xffffffff:08x} {c:02x}" for b, c, s in zip(bits, raw, sat) if c != s]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(f"# made by models/export/e4m3_table.py with torch {torch.__version__}\n" + "\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(lines)} lines)")


if __name__ == "__main__":
    main()
