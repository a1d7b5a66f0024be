"""DeepSeek-V4-Flash's released low-precision layout, written byte for byte with numpy (independent of MLX):

* FP8 linears: ``<name>.weight`` ``F8_E4M3 [out, in]`` + ``<name>.scale`` ue8m0 (``F8_E8M0``) block scales
  ``[ceil(out/bm), ceil(in/bk)]`` (``quantization_config.weight_block_size``, ``[128, 128]`` as released), or
  DeepSeek-V3-style ``<name>.weight_scale_inv`` ``F32`` block scales;
* FP4 routed experts (``expert_dtype: "fp4"``): ``layers.L.ffn.experts.E.w{1,2,3}.weight`` ``I8 [out, in/2]``
  (two e2m1 codes per byte, the low nibble first) + ``.scale`` ``F8_E8M0 [out, in/32]``;
* every other tensor (embeddings, norms, routers, hyper-connections, ``tid2eid``) as stored in float.

``dequantized`` decodes exactly those bytes back to float32: the reference checkpoint.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from tests.family_helpers import FIXTURES

V4 = FIXTURES / "hf_deepseek_v4"
_ST = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("int32"): "I32"}


def _e4m3_table() -> np.ndarray:
    """float value of each e4m3fn byte (NaN for 0x7f / 0xff)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3 = _e4m3_table()
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def _nearest(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    finite = np.where(np.isfinite(table))[0]
    i = np.argmin(np.abs(x[..., None] - table[finite]), axis=-1)
    return finite[i].astype(np.uint8)


def _ue8m0(amax: np.ndarray, top: float) -> np.ndarray:
    """Power-of-two scale byte (2**(b-127)) with amax / scale <= top."""
    e = np.ceil(np.log2(np.maximum(amax, 1e-30) / top))
    return np.clip(e + 127, 1, 254).astype(np.uint8)


def fp8_block(w: np.ndarray, block=(128, 128), float_scales=False):
    """-> (e4m3 bytes [out, in], scales [ceil(out/bm), ceil(in/bk)] as ue8m0 bytes or float32 scale_inv)."""
    out, inp = w.shape
    bm, bk = block
    gr, gc = -(-out // bm), -(-inp // bk)
    pad = np.zeros((gr * bm, gc * bk), np.float32)
    pad[:out, :inp] = w
    amax = np.abs(pad.reshape(gr, bm, gc, bk)).max(axis=(1, 3))
    if float_scales:
        s = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)
        sb = s
    else:
        sb = _ue8m0(amax, 448.0)
        s = (2.0 ** (sb.astype(np.float64) - 127)).astype(np.float32)
    full = np.repeat(np.repeat(s, bm, 0), bk, 1)[:out, :inp]
    return _nearest(E4M3, w / full), sb


def fp4_rows(w: np.ndarray):
    """-> (I8 bytes [out, in/2], ue8m0 scale bytes [out, in/32])."""
    out, inp = w.shape
    g = w.reshape(out, inp // 32, 32)
    sb = _ue8m0(np.abs(g).max(axis=-1), 6.0)
    s = 2.0 ** (sb.astype(np.float64) - 127)
    codes = _nearest(E2M1, (g / s[..., None]).reshape(out, inp).astype(np.float32))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), sb


def decode_fp8(q: np.ndarray, s: np.ndarray, block, float_scales=False) -> np.ndarray:
    out, inp = q.shape
    scale = s.astype(np.float32) if float_scales else (2.0 ** (s.astype(np.float64) - 127)).astype(np.float32)
    full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:out, :inp]
    return E4M3[q] * full


def decode_fp4(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    u = q.view(np.uint8)
    codes = np.stack([u & 0xF, u >> 4], axis=-1).reshape(u.shape[0], -1)
    scale = (2.0 ** (s.astype(np.float64) - 127)).astype(np.float32)
    return E2M1[codes] * np.repeat(scale, 32, axis=1)


def write_safetensors(path: Path, tensors: dict) -> None:
    """name -> (safetensors dtype, numpy array of the stored bytes' dtype)."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _is_fp8_linear(name: str, a: np.ndarray) -> bool:
    """The linears DeepSeek ships in FP8: attention, compressor / indexer projections, shared experts, MTP
    projections (routers, embeddings, the head, norms and hyper-connection weights stay in float)."""
    if a.ndim != 2 or not name.endswith(".weight") or ".ffn.experts." in name:
        return False
    leaf = name.split(".")[-2]
    return leaf in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "wgate", "weights_proj", "w1", "w2", "w3", "e_proj",
                    "h_proj")


def v4_checkpoints(dst: Path, *, experts="fp4", block=(128, 128), float_scales=False, expert_float_scales=False,
                   inter=32, seed=0, held_bf16=False):
    """(quantized dir, float reference dir): the V4 fixture with ``moe_intermediate_size`` widened to ``inter``
    (FP4 needs inputs in groups of 32), random expert / shared-expert weights, then stored in the released
    layout; the reference holds exactly the decoded values as float32 under the same names (``held_bf16``: FP8
    experts with float scales rounded to bfloat16, what the loader holds on a GPU: ``held``)."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    src = load_file(str(V4 / "model.safetensors"))
    cfg = json.loads((V4 / "config.json").read_text())
    H = cfg["hidden_size"]
    cfg["moe_intermediate_size"] = inter
    weights = {}
    for k, v in src.items():
        if ".ffn.experts." in k or ".ffn.shared_experts." in k:
            shape = (H, inter) if ".w2." in k else (inter, H)
            v = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        weights[k] = v
    quant, ref = {}, {}
    for k, v in weights.items():
        base = k[: -len(".weight")]
        if ".ffn.experts." in k and experts == "fp4":
            q, s = fp4_rows(v)
            quant[k], quant[base + ".scale"] = ("I8", q), ("F8_E8M0", s)
            ref[k] = decode_fp4(q, s)
        elif (".ffn.experts." in k and experts == "fp8") or _is_fp8_linear(k, v):
            fs = expert_float_scales if ".ffn.experts." in k else float_scales
            q, s = fp8_block(v, block, fs)
            quant[k] = ("F8_E4M3", q)
            quant[base + (".weight_scale_inv" if fs else ".scale")] = ("F32", s) if fs else ("F8_E8M0", s)
            ref[k] = decode_fp8(q, s, block, fs)
            if fs and held_bf16 and ".ffn.experts." in k:
                ref[k] = held(ref[k])
        else:
            quant[k] = (_ST[v.dtype], v)
            ref[k] = v
    qdir, rdir = dst / "quantized", dst / "reference"
    for d, c in ((qdir, dict(cfg)), (rdir, dict(cfg))):
        d.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(V4 / f, d / f)
        if d == qdir:
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                        "activation_scheme": "dynamic", "weight_block_size": list(block)}
            if experts == "fp4":
                c["expert_dtype"] = "fp4"
        (d / "config.json").write_text(json.dumps(c, indent=1))
    write_safetensors(qdir / "model.safetensors", quant)
    save_file({k: np.ascontiguousarray(v.astype(np.float32) if v.dtype == np.float32 else v) for k, v in ref.items()},
              str(rdir / "model.safetensors"))
    return qdir, rdir


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def held(decoded: np.ndarray) -> np.ndarray:
    """FP8 expert weights with float block scales as the loader holds them on a GPU: the decoded float32 value
    (e4m3 x scale) rounded once to bfloat16 (``quant_formats.MX_DTYPES``), as float32."""
    return from_bf16_bits(to_bf16_bits(decoded))


def fp8_hub_checkpoint(src: Path, dst: Path, block=(128, 128), held_bf16=False):
    """(quantized dir, float reference dir): an HF-layout checkpoint's attention and routed-expert linears in the
    fine-grained FP8 hub layout (``F8_E4M3`` weight + BF16 ``weight_scale_inv`` block scales,
    ``quantization_config: {quant_method: fp8, weight_block_size}``); routers, norms, embeddings and the head stay
    float. The reference holds exactly the decoded values as float32 (``held_bf16``: the routed experts' rounded
    to bfloat16, what the loader holds on a GPU: ``held``)."""
    from safetensors.numpy import load_file, save_file

    w = {}
    for f in sorted(src.glob("model*.safetensors")):
        w.update(load_file(str(f)))
    quant, ref = {}, {}
    for k, v in w.items():
        leaf = k.split(".")[-2] if k.endswith(".weight") else ""
        if v.ndim == 2 and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            q, s = fp8_block(v, block, float_scales=True)
            bits = to_bf16_bits(s)
            quant[k] = ("F8_E4M3", q)
            quant[k[: -len(".weight")] + ".weight_scale_inv"] = ("BF16", bits)
            ref[k] = decode_fp8(q, from_bf16_bits(bits), block, float_scales=True)
            if held_bf16 and ".experts." in k:
                ref[k] = held(ref[k])
        else:
            quant[k] = (_ST[v.dtype], v)
            ref[k] = v
    cfg = json.loads((src / "config.json").read_text())
    qdir, rdir = dst / "fp8", dst / "reference"
    for d in (qdir, rdir):
        d.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, d / f)
        c = dict(cfg)
        if d == qdir:
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(block)}
        (d / "config.json").write_text(json.dumps(c, indent=1))
    write_safetensors(qdir / "model.safetensors", quant)
    save_file({k: np.ascontiguousarray(v) for k, v in ref.items()}, str(rdir / "model.safetensors"))
    return qdir, rdir
