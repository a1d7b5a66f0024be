"""Live mach-serve for the server tests: a subprocess (the real CLI) or an in-process uvicorn thread, on a free
loopback port; a copy of the demo checkpoint whose chat template speaks Qwen-style tools."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

MODEL = "demo-qwen3-moe"

# A Qwen-style tool-calling chat template (tools listed in the system turn, calls in <tool_call> blocks, results
# in <tool_response> blocks of a user turn), written for these tests over the demo model's ChatML tokens.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nCall a function by writing its name and arguments as JSON inside <tool_call></tool_call> tags.\n"
    "<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] or '' }}"
    "{%- for tc in m.get('tool_calls') or [] %}\n<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def demo_dir() -> Path:
    from mach_runtime.assets import demo_model_path

    return demo_model_path()


def tool_checkpoint(dst: Path) -> Path:
    """The demo checkpoint (weights linked) with the Qwen-style tool template in tokenizer_config.json."""
    src = demo_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc=None, timeout: float = 240.0, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mach-serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mach-serve at {base} not ready after {timeout}s")


@contextlib.contextmanager
def serve_subprocess(*args: str, log_path: Path, env: dict | None = None, port: int | None = None):
    """``mach-serve ARGS --port P`` as a subprocess (the real CLI); yields (base url, Popen); SIGTERM at exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mach_runtime.cli.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@contextlib.contextmanager
def serve_in_thread(settings):
    """The app under uvicorn in a thread of this process (tests that need a fault hook); yields the base url."""
    import uvicorn

    from mach_runtime.server.production_app import create_app

    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=10))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base, app
    finally:
        server.should_exit = True
        t.join(timeout=60)
