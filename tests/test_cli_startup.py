"""``mach`` / ``mach-serve`` keep torch out of their process (mach_runtime/cli/startup.py): transformers then
treats torch as absent, while ``MACH_IMPORT_TORCH=1`` lets it in and a caller of ``main(argv)`` keeps its own
imports. (That the programs still do all they do without torch: every CLI and server test runs them so.)"""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib.util, json, sys
from mach_runtime.cli.main import main
sys.argv = ["mach", "make-tiny", "--help"]
try:
    main()
except SystemExit:
    pass
out = {"spec": importlib.util.find_spec("torch") is not None}
try:
    import torch  # noqa: F401
    out["import"] = True
except ImportError:
    out["import"] = False
from transformers.utils import is_torch_available
out["transformers"] = is_torch_available()
print("PROBE" + json.dumps(out))
"""


def _probe(**env):
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=child_env(ROOT, **env))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(l for l in r.stdout.splitlines() if l.startswith("PROBE"))[5:])


def test_programs_keep_torch_out_unless_asked():
    import importlib.util

    assert importlib.util.find_spec("torch") is not None  # the test extra installs it: the check has power
    assert _probe(MACH_IMPORT_TORCH="0") == {"spec": False, "import": False, "transformers": False}


def test_import_torch_setting_and_in_process_callers_keep_torch(capsys):
    import importlib.util

    import pytest

    from mach_runtime.cli.main import main

    with pytest.raises(SystemExit):
        main(["make-tiny", "--help"])  # argv given: the caller's process keeps torch
    capsys.readouterr()
    assert sys.modules.get("torch", True) is not None and importlib.util.find_spec("torch") is not None
    r = subprocess.run([sys.executable, "-c", "from mach_runtime.cli.startup import keep_torch_out; "
                        "import importlib.util; print(keep_torch_out(), importlib.util.find_spec('torch') is None)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=child_env(ROOT, MACH_IMPORT_TORCH="1"))
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr[-2000:]
