"""The mach-serve command itself: the bundled demo model when no checkpoint is given, startup log lines, the API
key (flag or $MACH_API_KEY), SIGTERM mid-stream (in-flight requests drain or fail with an error event; the
process exits cleanly), and flags the Runtime cannot honour yet failing with a clear message."""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_helpers import MODEL, serve_subprocess, wait_ready

openai = pytest.importorskip("openai")


def sse(base, payload, headers, out: list, first: threading.Event):
    with httpx.stream("POST", base + "/v1/chat/completions", json=payload, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                if len(out) >= 3:
                    first.set()


def test_demo_model_api_key_and_sigterm_mid_stream(tmp_path):
    log = tmp_path / "serve.log"
    with serve_subprocess("--no-streaming", "--shutdown-timeout", "10", "--max-batch", "4", log_path=log,
                          env={"MACH_API_KEY": "sekrit"}) as (base, proc):
        auth = {"Authorization": "Bearer sekrit"}
        wait_ready(base, proc)  # /health needs no key
        assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        client = openai.OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]  # the bundled demo model
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        text = log.read_text()
        from mach_runtime.cli.serve import demo_draft_pays

        path = ("decode_path=specdec-native_v7 draft=demo-qwen3-moe-dflash spec_batch=4 "
                "lane_policy=spec_upto_4_live_then_target_only_until_drained adaptive_block_policy=fixed"
                if demo_draft_pays() else "decode_path=batched-target draft=none spec_batch=0 lane_policy=target_only")
        for key in ("startup mode model=demo-qwen3-moe", "expert_residency=stacked", "startup bank", path,
                    "startup capabilities arch=qwen3_moe", "tool_format=qwen_json", "auth=1"):
            assert key in text, key

        short, long_ = [], []
        s_first, l_first = threading.Event(), threading.Event()
        msgs = [{"role": "user", "content": "def add(a, b):"}]
        threads = [threading.Thread(target=sse, args=(base, {"model": MODEL, "messages": msgs, "max_tokens": n,
                                                             "temperature": 0, "stream": True}, auth, out, ev))
                   for n, out, ev in ((12, short, s_first), (1000, long_, l_first))]
        for t in threads:
            t.start()
        assert s_first.wait(120) and l_first.wait(120)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        # uvicorn re-raises the signal once its graceful shutdown is complete: exit by SIGTERM, after the log says so
        assert proc.wait(60) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "shutdown in_flight=" in text and "Application shutdown complete" in text, text[-2000:]
    assert "Traceback" not in text, text
    assert short[-1] == "[DONE]" and long_[-1] == "[DONE]"
    # the short one drained: it finished normally
    assert json.loads(short[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    # the long one outlived the shutdown timeout: an error event, then [DONE] (no silent truncation)
    last = json.loads(long_[-2])
    assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] == "length"


def test_prefix_cache_flags_reach_runtime_open(tmp_path):
    from mach_runtime import Runtime
    from mach_runtime.errors import ConfigError
    from mach_runtime.server.production_app import runtime_kwargs
    from mach_runtime.server.settings import ServerSettings

    s = ServerSettings(streaming=True, prefix_cache=True, disk_kv_dir=str(tmp_path), disk_kv_budget_gb=0.5)
    kw = runtime_kwargs(s, Runtime.open)
    assert kw["prefix_cache"] is True and kw["prefix_cache_dir"] == str(tmp_path) and kw["disk_kv_budget_gb"] == 0.5
    assert kw["expert_residency"] == "streaming"

    def open_without_prefix_cache(checkpoint=None, *, draft=None, expert_residency=None, expert_cache_gb=None,
                                  max_batch=8):
        pass  # the signature of a Runtime build without the prefix cache

    with pytest.raises(ConfigError, match="has no prefix cache"):
        runtime_kwargs(s, open_without_prefix_cache)


def test_streaming_and_no_streaming_are_required():
    r = subprocess.run([sys.executable, "-m", "mach_runtime.cli.serve"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--streaming" in r.stderr


def test_draft_flags_and_the_demo_default():
    from mach_runtime.assets import default_draft
    from mach_runtime.cli.serve import DEMO_SPEC_BATCH, demo_draft_pays, main, parser, settings_from

    demo = settings_from(parser().parse_args(["--no-streaming"]))
    if demo_draft_pays():  # a GPU: the bundled pair's measured best, the draft in the spec batch with fixed blocks
        assert demo.draft == str(default_draft()) and demo.spec_batch_size == DEMO_SPEC_BATCH
        assert demo.open_kwargs["specdec"].policy == "fixed"
    else:  # the CPU: drafting does not pay, target-only batching
        assert demo.draft is None and demo.spec_batch_size == 0 and demo.open_kwargs == {}
    off = settings_from(parser().parse_args(["--no-streaming", "--no-draft"]))
    assert off.draft is None and off.spec_batch_size == 0
    s = settings_from(parser().parse_args(["/ckpt", "--no-streaming", "--draft", "/d", "--block-policy", "throughput",
                                           "--max-batch", "6"]))
    assert s.draft == "/d" and s.spec_batch_size == 6 and s.open_kwargs["specdec"].policy == "throughput"
    assert settings_from(parser().parse_args(["/c", "--no-streaming", "--draft", "/d", "--spec-batch", "0"])
                         ).spec_batch_size == 0
    assert settings_from(parser().parse_args(["/c", "--no-streaming"])).draft is None  # another checkpoint: none
    assert main(["/c", "--no-streaming", "--draft", "/d", "--spec-batch", "1"]) == 2
    with pytest.raises(SystemExit):
        parser().parse_args(["--no-streaming", "--draft", "/d", "--no-draft"])
