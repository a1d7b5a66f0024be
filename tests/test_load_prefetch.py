"""load_moe's background read of the non-expert weights (io/non_experts.py) and the collector pause (io/gc_pause.py):
the arrays are mx.load's bit for bit, the model keeps them, errors reach the caller, nothing is left running."""

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mach_runtime import load_moe
from mach_runtime.errors import CheckpointError
from mach_runtime.io import load_thread, non_experts
from mach_runtime.io.safetensors_index import CheckpointIndex
from tests import tolerances as tol
from tests.helpers import HF_QWEN3_MOE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from open_close_leaks import os_threads  # noqa: E402  (the leak bench's count: polled until joined threads leave)


@pytest.fixture(scope="module")
def q4_sharded(tmp_path_factory):
    """4-bit MLX stacked export (mlx-lm's quantize_model) split over several shards."""
    from mach_runtime.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("q4") / "ckpt", layout="stacked", quant_bits=4,
                                quant_group=32, shard_bytes=40_000, hidden=64, layers=2, experts=8, top_k=2,
                                moe_inter=32, tokenizer_from=HF_QWEN3_MOE)


def _same(a, b) -> bool:
    """Bitwise: dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.array(a.view(mx.uint8)), np.array(b.view(mx.uint8)))


def _reference(index: CheckpointIndex) -> dict:
    out = {}
    for f in index.files:
        out.update(mx.load(f))
    return out


def test_prefetch_arrays_are_mx_load_bitwise(q4_sharded, monkeypatch):
    monkeypatch.setattr(non_experts, "_CHUNK_BYTES", 3000)  # many chunks, each file split across several
    index = CheckpointIndex(q4_sharded)
    assert len(index.files) > 1
    names = index.names()
    got = non_experts.Prefetch(index, names).arrays()
    want = _reference(index)
    assert set(got) == set(names)
    assert all(_same(got[n], want[n]) for n in names)


def _dequantized_by_the_backend(params: dict, want: dict, config: dict) -> dict:
    """The layers load_moe holds dequantized on this backend (io/backend_faults.py: on MLX CUDA, affine layers with
    one quantization group per row, the tiny models' routers): ``name.weight`` -> what it must equal bitwise,
    ``mx.dequantize`` of the stored weight, scales and biases. Empty on the CPU."""
    out = {}
    for k, w in want.items():
        p = params.get(k)
        if not k.endswith(".weight") or p is None or w.dtype != mx.uint32 or p.dtype == mx.uint32:
            continue
        base = k[: -len(".weight")]
        q = config["quantization"].get(base, config["quantization"])
        out[k] = mx.dequantize(w, want[base + ".scales"], want.get(base + ".biases"), q["group_size"], q["bits"],
                               dtype=want[base + ".scales"].dtype)
    return out


@pytest.mark.parametrize("residency", ["streaming", "stacked"])
def test_load_moe_keeps_the_prefetched_tensors(q4_sharded, residency):
    """Every non-expert parameter is the checkpoint's tensor as stored, evaluated when load_moe returns (a layer the
    backend's faults make us hold dequantized: exactly its dequantized tensor)."""
    model, tok, store, cache = load_moe(q4_sharded, expert_residency=residency)
    try:
        want = _reference(CheckpointIndex(q4_sharded))
        params = dict(tree_flatten(model.parameters()))
        detour = _dequantized_by_the_backend(params, want, json.loads((q4_sharded / "config.json").read_text()))
        assert not detour or tol.CUDA  # the CPU holds every layer as stored
        kept = [k for k in params if k in want and k not in detour]
        assert len(kept) >= 20  # attention, norms, router, embedding, head (weights, scales, biases)
        differ = [(k, params[k].dtype, want[k].dtype, params[k].shape, want[k].shape) for k in kept
                  if not _same(params[k], want[k])]
        differ += [(k, "dequantized") for k, w in detour.items() if not _same(params[k], w)]
        assert not differ, differ[:6]
    finally:
        store.close()
    assert load_thread.wait_idle(5)  # the read has ended (the load thread is parked for the next load)


def test_vanished_shard_is_the_callers_error(q4_sharded, tmp_path):
    """A shard that disappears after its header was read: the background read's error reaches the caller."""
    ck = tmp_path / "ck"
    shutil.copytree(q4_sharded, ck)
    index = CheckpointIndex(ck)
    os.remove(index.files[-1])
    pf = non_experts.Prefetch(index, index.names())
    with pytest.raises((RuntimeError, OSError, ValueError)):
        pf.arrays()


def test_failed_load_stops_the_read_and_resumes_the_collector(q4_sharded, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(q4_sharded, ck)
    (ck / "tokenizer.json").write_text("{ not json")  # fails after the background read has started
    assert gc.isenabled()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_moe(ck, expert_residency="streaming")
    assert gc.isenabled()
    assert load_thread.wait_idle(5)  # the read has ended (the load thread is parked for the next load)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads through /proc (Linux)")
@pytest.mark.parametrize("residency", ["streaming", "stacked"])
def test_loads_leave_no_os_thread_behind(q4_sharded, residency):
    """Each thread that ran MLX ops leaves an OS thread of MLX's behind when it ends: the background read runs on one
    thread for the process, so repeated loads keep the count flat (a thread per load: +1 per load, CPU and CUDA)."""
    counts = []
    for _ in range(4):
        model, tok, store, cache = load_moe(q4_sharded, expert_residency=residency)
        store.close()
        del model, tok, store, cache
        gc.collect()
        counts.append(os_threads())
    assert max(counts[1:]) <= counts[0], counts


def test_collector_left_as_the_program_set_it(q4_sharded):
    gc.disable()
    try:
        model, tok, store, cache = load_moe(q4_sharded, expert_residency="streaming")
        store.close()
        assert not gc.isenabled()
    finally:
        gc.enable()
    model, tok, store, cache = load_moe(q4_sharded, expert_residency="streaming")
    store.close()
    assert gc.isenabled()


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the automatic float32 cast applies on the CPU backend")
def test_converted_bf16_with_float_cast_equals_its_source(tiny_dir, tmp_path):
    """A `mach convert` checkpoint's read starts before its sidecar is parsed; when the sidecar then calls for a float
    cast (unquantized bf16 experts on the CPU) that read is dropped and the weights are cast as without it."""
    from mach_runtime.io.convert import convert_checkpoint
    from tests.helpers import convert

    src = convert(tiny_dir, tmp_path / "bf16", dtype="bfloat16")
    dst = convert_checkpoint(src, tmp_path / "side", progress=False)
    want, _, wstore, _ = load_moe(src, expert_residency="stacked")
    got, _, gstore, _ = load_moe(dst, expert_residency="streaming", expert_slots=16)
    try:
        w, g = dict(tree_flatten(want.parameters())), dict(tree_flatten(got.parameters()))
        shared = [k for k in w if k in g and ".switch_mlp." not in k]
        assert len(shared) >= 10 and all(g[k].dtype == mx.float32 for k in shared)
        assert all(_same(g[k], w[k]) for k in shared)
    finally:
        wstore.close()
        gstore.close()
    assert load_thread.wait_idle(5)  # the read has ended (the load thread is parked for the next load)
