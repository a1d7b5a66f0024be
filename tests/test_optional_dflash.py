"""The base install has no dflash-mlx (it is the ``[dflash]`` extra): everything but DFlash drafting must import
and run without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import HF_QWEN3_MOE  # a tiny transformers-saved qwen3_moe: the test needs no size


def test_target_only_and_prompt_lookup_run_without_dflash_mlx():
    code = textwrap.dedent(f"""
        import sys
        sys.modules["dflash_mlx"] = None  # import dflash_mlx now raises ImportError, as when it is not installed
        sys.modules["dflash_mlx.model"] = None
        sys.modules["torch"] = None  # nor is torch in the base install (the test extra brings it)
        import mach_runtime
        from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, Runtime
        from mach_runtime.engine.specdec.draft_cache import RingDraftCache
        from mach_runtime.errors import ConfigError
        eng = BlockSpecDecEngine.from_checkpoint({str(HF_QWEN3_MOE)!r},
                                                 config=BlockSpecDecEngineConfig(mode="target_only"))
        out = [t for c in eng.generate([5, 6, 7], max_tokens=4, ignore_eos=True) for t in c.token_ids]
        look = [t for c in eng.generate([5, 6, 7, 5, 6], max_tokens=4, ignore_eos=True, mode="prompt_lookup")
                for t in c.token_ids]
        assert len(out) == 4 and len(look) == 4
        try:
            RingDraftCache()
        except ConfigError as e:
            assert "mach_runtime[dflash]" in str(e)
        else:
            raise AssertionError("RingDraftCache without dflash-mlx")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
