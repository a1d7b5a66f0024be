"""The L2 ``DiskKVCache`` and the prefix index on their own (no model): bad files are counted misses that get
deleted, writers in several processes never corrupt a shared directory, the budget holds, and the longest-prefix
index returns exactly what a snapshot can restore. DeepSeek-V4's compressed caches round-trip through a file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from mach_runtime.engine.disk_kv_cache import TMP_PREFIX, DiskKVCache
from mach_runtime.engine.kv_snapshot import LayerRecord, Snapshot
from mach_runtime.engine.prefix_cache import PrefixCache
from mach_runtime.engine.prefix_keys import IndexEntry, PrefixIndex, block_hashes, prefix_salt

SALT = prefix_salt("model-a", {"format": 1})
B = 8


def snap(tokens, cls="KVCache", seed=0, dim=16) -> Snapshot:
    """A host snapshot of one KVCache layer (arrays as a real capture produces them)."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    k = rng.standard_normal((1, 2, n, dim)).astype(np.float32)
    v = rng.standard_normal((1, 2, n, dim)).astype(np.float32)
    meta = {"offset": n} if cls == "KVCache" else {"size": 2}
    return Snapshot(np.asarray(tokens, np.uint32), [LayerRecord(cls, meta, ["L0.k", "L0.v"])],
                    {"L0.k": k, "L0.v": v}, {"L0.k": "float32", "L0.v": "float32"})


def cache(tmp_path, budget=1 << 30, salt=SALT) -> PrefixCache:
    return PrefixCache(salt, block_size=B, disk=DiskKVCache(tmp_path, salt, B, budget))


def save(pc: PrefixCache, s: Snapshot) -> str:
    key, writes = pc.insert(s)
    for k, x in writes:
        pc.disk.save(k, x, pc.hashes_of(x))
        pc.mark_on_disk(k)
    return key


def test_roundtrip_and_lookup(tmp_path):
    toks = list(range(1, 30))
    pc = cache(tmp_path)
    key = save(pc, snap(toks))
    fresh = cache(tmp_path)  # a new runtime: the index comes from the headers on disk
    e, n = fresh.lookup(toks + [99], 29)
    assert e.key == key and e.tier == "l2" and n == 29
    got = fresh.load_l2(key)
    want = snap(toks)
    assert all(np.array_equal(got.arrays[k], want.arrays[k]) for k in want.arrays)
    assert got.tokens.tolist() == toks


def test_index_cuttable_and_exact_only():
    idx = PrefixIndex(B, SALT)
    a = np.arange(1, 41, dtype=np.uint32)
    idx.add(IndexEntry("cut", a, True, "l1", 1))
    idx.add(IndexEntry("exact", a[:24], False, "l1", 1))
    req = np.concatenate([a[:20], [999, 998]]).astype(np.uint32)
    e, n = idx.lookup(req, len(req) - 1)
    assert (e.key, n) == ("cut", 20)  # any common prefix of a cuttable snapshot
    idx.remove("cut")
    assert idx.lookup(req, len(req) - 1) == (None, 0)  # the exact-only one covers 24 > 20 shared tokens
    req = np.concatenate([a[:24], [5]]).astype(np.uint32)
    e, n = idx.lookup(req, len(req) - 1)
    assert (e.key, n) == ("exact", 24)
    assert idx.lookup(a[:5], 4) == (None, 0)  # shorter than a block: never worth a restore


def test_salt_separates_models_and_layouts():
    t = list(range(40))
    assert block_hashes(t, B, SALT) != block_hashes(t, B, prefix_salt("model-b", {"format": 1}))
    assert block_hashes(t, B, SALT) != block_hashes(t, B, prefix_salt("model-a", {"format": 1, "kv_bits": 8}))
    assert block_hashes(t, B, SALT)[:2] == block_hashes(t[:17], B, SALT)  # chained: prefixes share hashes


def _one_file(tmp_path):
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".safetensors")]
    assert len(files) == 1
    return files[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "old_format", "foreign"])
def test_bad_files_are_counted_misses(tmp_path, damage):
    toks = list(range(1, 30))
    key = save(cache(tmp_path), snap(toks))
    path = _one_file(tmp_path)
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip":
        raw = raw[:-50] + bytes(b ^ 0xFF for b in raw[-50:-40]) + raw[-40:]
    elif damage == "garbage":
        raw = os.urandom(len(raw))
    elif damage == "empty":
        raw = b""
    else:
        (n,) = struct.unpack("<Q", raw[:8])
        head = json.loads(raw[8 : 8 + n])
        meta = json.loads(head["__metadata__"]["mach_kv"])
        if damage == "old_format":
            meta["format"] = 0
        else:
            meta["salt"] = prefix_salt("model-b", {"format": 1}).hex()
        head["__metadata__"]["mach_kv"] = json.dumps(meta)
        hb = json.dumps(head).encode()
        hb += b" " * (-len(hb) % 8)
        raw = struct.pack("<Q", len(hb)) + hb + raw[8 + n :]
    open(path, "wb").write(raw)
    pc = cache(tmp_path)  # the scan reads headers: a bad header is dropped there
    e, n = pc.lookup(toks + [7], 29)
    if e is not None:  # a header that still parses: the load finds the damage
        assert pc.load_l2(e.key) is None
        assert pc.lookup(toks + [7], 29) == (None, 0)
    assert not os.path.exists(path)
    d = pc.disk.stats()
    kind = {"old_format": d.old_format_dropped, "foreign": d.foreign_dropped}.get(damage, d.corrupt_dropped)
    assert kind == 1 and d.files == 0
    assert key  # (the writer's key)


def test_budget_evicts_lowest_value(tmp_path):
    size = None
    pc = cache(tmp_path, budget=1 << 30)
    hot = list(range(1, 60))
    save(pc, snap(hot, seed=1))
    size = os.path.getsize(_one_file(tmp_path))
    pc.disk.budget_bytes = int(size * 3.5)
    for _ in range(3):  # hits raise the hot entry's value
        pc.load_l2(pc.index.key_of(np.asarray(hot, np.uint32)))
    for k in range(8):
        save(pc, snap([1000 + 100 * k + i for i in range(59)], seed=k + 2))
        n, b = pc.disk.usage()
        assert b <= pc.disk.budget_bytes
    assert pc.disk.exists(pc.index.key_of(np.asarray(hot, np.uint32)))
    assert pc.disk.stats().evictions >= 6


def test_own_writes_are_not_a_directory_change_but_anothers_are(tmp_path):
    """A lookup rescans the directory only when ``changed``: this runtime's own saves and evictions do not count
    (its index knows them), a file another runtime wrote does, and the rescan then indexes it."""
    a, b = cache(tmp_path), cache(tmp_path)
    a.rescan()
    save(a, snap(list(range(1, 20))))
    assert not a.disk.changed(a.known_on_disk()) and a.disk.changed()  # (mtime alone: it moved)
    other = save(b, snap(list(range(50, 70)), seed=1))
    assert a.disk.changed(a.known_on_disk())
    a.apply_scan(*a.disk.scan(a.known_on_disk()))
    assert other in a.known_on_disk() and not a.disk.changed(a.known_on_disk())


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from tests.test_disk_kv_cache import cache, save, snap
from pathlib import Path
pc = cache(Path(sys.argv[1]), budget=int(sys.argv[4]))
w = int(sys.argv[2])
for k in range(25):
    save(pc, snap([(k % 6) * 50 + i + 1 for i in range(40)], seed=k % 6))  # every writer writes the same 6 keys
    pc.rescan()
print(pc.disk.stats().corrupt_dropped)
"""


def test_concurrent_writers_in_processes_share_one_directory(tmp_path):
    """Three processes write the same keys (same content) and evict under a small budget at once: every file
    that remains is whole and valid, no temp file is left, nothing was ever seen corrupt."""
    one = os.path.getsize(_written(tmp_path / "probe"))
    budget = one * 4
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "shared"), str(w), os.getcwd(),
                               str(budget)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all(o[0].strip() == "0" for o in outs)
    pc = cache(tmp_path / "shared", budget=budget)
    names = os.listdir(pc.disk.dir)
    assert not [n for n in names if n.startswith(TMP_PREFIX)]
    assert pc.disk.stats().corrupt_dropped == 0 and 0 < len(pc.index) <= 4
    for key in list(pc.index.entries):
        assert pc.load_l2(key) is not None
    assert pc.disk.usage()[1] <= budget


def _written(d) -> str:
    save(cache(d), snap([i + 1 for i in range(40)]))
    return _one_file(d)


def test_stale_temp_file_of_a_dead_writer_is_removed(tmp_path):
    pc = cache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp = os.path.join(pc.disk.dir, f"{TMP_PREFIX}{int(dead.stdout)}-1-abc")
    open(tmp, "wb").write(b"half a snapshot")
    cache(tmp_path)  # the next scan
    assert not os.path.exists(tmp)


def test_deepseek_v4_compressed_cache_roundtrip(tmp_path):
    """deepseek_v4's compressed caches (window, pooled entries, overlap state) restore from a file exactly where
    they were saved: continuing greedy decoding matches the cold run."""
    import mlx.core as mx

    from mach_runtime import load_moe
    from tests.family_helpers import FAMILIES

    path = os.path.join(os.path.dirname(FAMILIES["gpt_oss"]), "hf_deepseek_v4")
    model, _, _, _ = load_moe(path, expert_residency="stacked")
    from mach_runtime.engine.kv_snapshot import capture

    ids = [5, 17, 99, 3, 250, 77, 12, 40, 41, 7, 8, 9, 10] * 3

    def run(cache, feed, n=8):
        logits, out = model(mx.array([feed]), cache=cache), []
        for _ in range(n):
            out.append(int(mx.argmax(logits[0, -1]).item()))
            logits = model(mx.array([[out[-1]]]), cache=cache)
        return out

    ref = run(model.make_cache(), ids)
    c = model.make_cache()
    model(mx.array([ids[:-1]]), cache=c)
    s = capture(c, ids[:-1]).to_host()
    assert not s.cuttable
    salt = prefix_salt("v4", {})
    pc = PrefixCache(salt, block_size=B, disk=DiskKVCache(tmp_path, salt, B, 1 << 30))
    key = save(pc, s)
    back = PrefixCache(salt, block_size=B, disk=DiskKVCache(tmp_path, salt, B, 1 << 30)).load_l2(key)
    caches, n, _ = back.restore()
    assert n == len(ids) - 1 and run(caches, ids[-1:]) == ref
