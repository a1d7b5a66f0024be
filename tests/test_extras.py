"""pyproject's extras say what they install: ``cuda`` / ``cuda13`` pull MLX's CUDA builds at the pinned MLX
version (the spelling the installed mlx's own metadata declares), ``test`` brings torch for the
transformers-saved checkpoints built at test time."""

import re
import tomllib
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_cuda_extras_match_mlx_metadata():
    project = _project()
    pin = next(re.search(r"==([\w.]+)", d).group(1) for d in project["dependencies"] if d.startswith("mlx[cpu]"))
    assert pin == version("mlx")
    declared = {}  # mlx's own extras: extra -> requirement
    for r in requires("mlx") or []:
        m = re.search(r'extra == "([\w-]+)"', r)
        if m:
            declared[m.group(1)] = r.split(";")[0].strip()
    extras = project["optional-dependencies"]
    for ours, theirs, package in (("cuda", "cuda", "mlx-cuda-12"), ("cuda13", "cuda13", "mlx-cuda-13")):
        (req,) = extras[ours]
        assert req == f"mlx[{theirs}]=={pin}; sys_platform == 'linux'", req
        assert declared[theirs] == f"{package}=={pin}", declared
    readme = (ROOT / "README.md").read_text()
    assert '".[cuda]"' in readme and "mlx-cuda-12==" + pin in readme


def test_test_extra_installs_torch():
    assert "torch==2.13.0" in _project()["optional-dependencies"]["test"]
    try:
        version("mach-runtime")
    except PackageNotFoundError:  # run from a source tree (the GPU machine's kit): no extra was installed here
        pytest.skip("mach-runtime is not installed: the test extra's pins were not applied to this environment")
    assert version("torch").startswith("2.13.0")
