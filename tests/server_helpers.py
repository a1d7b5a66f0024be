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


# Two more families' formats, written for these tests over the demo model's tokens: each renders tools, assistant
# tool calls and tool results the way the family's own template does (gpt-oss harmony: "<|start|>assistant
# to=functions.NAME<|channel|>commentary json<|message|>ARGS<|end|>", results from "functions.NAME to=assistant";
# Gemma 4: "<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>" with keys sorted, results in
# "<|tool_response>response:NAME{value:...}<tool_response|>"), so the server picks the family's parser from it.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Reasoning: low<|end|>"
    "{% if tools %}<|start|>developer<|message|># Tools\n\nnamespace functions {\n"
    "{% for t in tools %}type {{ t.function.name }} = (_: {{ t.function.parameters | tojson }}) => any;\n{% endfor %}"
    "} // namespace functions<|end|>{% endif %}"
    "{% set last = namespace(name=none) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}{% set tc = m.tool_calls[0].function %}"
    "<|start|>assistant to=functions.{{ tc.name }}<|channel|>commentary json<|message|>{{ tc.arguments | tojson }}"
    "<|end|>{% set last.name = tc.name %}"
    "{% elif m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'tool' %}<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ m['content'] | tojson }}<|end|>"
    "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
GEMMA4_TEMPLATE = (
    "{% if tools or messages[0]['role'] == 'system' %}<|turn>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for t in tools or [] %}<|tool>declaration:{{ t.function.name }}{{ t.function.parameters | tojson }}<tool|>"
    "{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|turn>model\n"
    "{% for tc in m.get('tool_calls') or [] %}<|tool_call>call:{{ tc.function.name }}{{ '{' }}"
    "{% for k, v in tc.function.arguments | dictsort %}{{ ',' if not loop.first }}{{ k }}:"
    "{% if v is string %}<|\"|>{{ v }}<|\"|>{% else %}{{ v | tojson }}{% endif %}{% endfor %}}<tool_call|>"
    "{% endfor %}{{ m['content'] or '' }}<turn|>\n"
    "{% elif m['role'] == 'tool' %}<|turn>user\n<|tool_response>response:{{ m.get('name') or 'tool' }}"
    "{value:<|\"|>{{ m['content'] }}<|\"|>}<tool_response|><turn|>\n"
    "{% elif m['role'] != 'system' %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def demo_dir() -> Path:
    from mach_runtime.assets import demo_model_path

    return demo_model_path()


def tool_checkpoint(dst: Path, template: str = TOOL_TEMPLATE) -> Path:
    """The demo checkpoint (weights linked) with a tool-calling chat template (default: Qwen-style) in
    tokenizer_config.json."""
    src = demo_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
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
