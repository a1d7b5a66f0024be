"""Repository ids resolve through the local Hugging Face cache as mlx-lm resolves them (offline): HF_HOME /
HF_HUB_CACHE, refs (branches, tags), commit hashes, snapshots; a clear CheckpointNotFoundError naming the cache
path when absent. The cache is laid out with huggingface_hub's own functions and checked with its scanner."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load, load_moe
from mach_runtime.errors import CheckpointNotFoundError
from tests.helpers import HF_QWEN3_MOE

REPO = "tiny-org/tiny-qwen3-moe"
IDS = [1, 2, 3, 4, 5, 6, 7, 8]


def add_snapshot(cache: Path, repo_id: str, src: Path, revision: str | None = "main") -> str:
    """Puts ``src``'s files into the hub cache as huggingface_hub stores a download: blobs named by their
    sha256, ``snapshots/<commit>/<file>`` links to them, ``refs/<revision>`` holding the commit."""
    from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision, _create_symlink,
                                               repo_folder_name)

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in src.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    for p in files:
        blob = storage / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        dst = storage / "snapshots" / commit / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(dst), new_blob=False)
    if revision is not None:
        _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return commit


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An HF_HOME whose hub cache holds REPO (main) and, under the tag v2, a different checkpoint."""
    from huggingface_hub import constants, scan_cache_dir

    home = tmp_path / "hf_home"
    cache = home / "hub"
    main = add_snapshot(cache, REPO, HF_QWEN3_MOE)
    other = tmp_path / "other"
    shutil.copytree(HF_QWEN3_MOE, other)
    from safetensors.numpy import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] * 2.0
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    v2 = add_snapshot(cache, REPO, other, revision="v2")
    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}  # huggingface_hub reads the layout back
    refs = {ref for rev in info[REPO].revisions for ref in rev.refs}
    assert refs == {"main", "v2"} and {rev.commit_hash for rev in info[REPO].revisions} == {main, v2}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return {"home": home, "cache": cache, "main": main, "v2": v2}


def logits(path, **kw):
    model, _, store, _ = load_moe(path, **kw)
    try:
        return np.array(model(mx.array([IDS]))[0])
    finally:
        store.close()


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_load_moe_repo_id_from_cache(hub, residency):
    want = logits(HF_QWEN3_MOE, expert_residency=residency)
    np.testing.assert_array_equal(logits(REPO, expert_residency=residency), want)
    tagged = logits(REPO, revision="v2", expert_residency=residency)
    np.testing.assert_allclose(tagged, 2 * want, rtol=1e-5, atol=1e-5)  # the tag's snapshot: lm_head doubled
    np.testing.assert_array_equal(logits(REPO, revision=hub["v2"], expert_residency=residency), tagged)


def test_load_repo_id_from_cache(hub):
    model, tok = load(REPO)
    assert tok.encode("def f():") and model(mx.array([IDS])).shape[-1] == 512


def test_absent_repo_names_the_cache_path(hub):
    with pytest.raises(CheckpointNotFoundError) as e:
        load_moe("tiny-org/absent")
    assert str(hub["cache"] / "models--tiny-org--absent") in str(e.value)
    with pytest.raises(CheckpointNotFoundError, match="'nope' of this repository is not in the Hugging Face cache"):
        load_moe(REPO, revision="nope")


def test_absent_local_path_is_not_looked_up(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist.*never downloads"):
        load_moe(tmp_path / "nope")


@pytest.mark.anyio
async def test_runtime_opens_repo_id(hub):
    from mach_runtime import Runtime

    async with Runtime.open(REPO, expert_residency="streaming", max_batch=2) as rt:
        out = await rt.generate([1, 2, 3], max_tokens=4, temperature=0.0)
    async with Runtime.open(HF_QWEN3_MOE, expert_residency="streaming", max_batch=2) as rt:
        want = await rt.generate([1, 2, 3], max_tokens=4, temperature=0.0)
    assert out.token_ids == want.token_ids


def _cli(args, home):
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a CLI subprocess (~6-10 s); the in-process tests cover the same code
def test_cli_commands_resolve_repo_ids_through_hf_home(hub):
    """HF_HOME alone (no HF_HUB_CACHE) locates the cache, as huggingface_hub and mlx-lm do."""
    r = _cli(["mach_runtime.cli.check", REPO, "--json", "--memory-gb", "8"], hub["home"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == str(hub["cache"] / "models--tiny-org--tiny-qwen3-moe" / "snapshots"
                                                     / hub["main"])
    r = _cli(["mach_runtime.cli.main", "generate", "--model", REPO, "--prompt", "def f", "--max-tokens", "3",
              "--ignore-chat-template", "--revision", "v2"], hub["home"])
    assert r.returncode == 0, r.stderr
    r = _cli(["mach_runtime.cli.check", "tiny-org/absent"], hub["home"])
    assert r.returncode == 2 and "models--tiny-org--absent" in r.stderr and "Traceback" not in r.stderr
