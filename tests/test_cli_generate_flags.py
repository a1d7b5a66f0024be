"""``mach generate`` takes mlx-lm's flags and defaults (and gives mlx-lm's output on a model both load); every
command-line entry point exits quietly when its reader closes the pipe."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mach_runtime.assets import demo_model_path
from mach_runtime.cli import generate as gen
from tests import tolerances as tol
from tests.helpers import HF_QWEN3_MOE

DEMO = str(demo_model_path())


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """fp32 qwen3_moe with head_dim 32 (KV quantization groups must divide head_dim)."""
    from mach_runtime.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("t32") / "ckpt", hidden=64, heads=2, head_dim=32,
                                tokenizer_from=HF_QWEN3_MOE)


def _mach(argv, capsys, stdin=None, monkeypatch=None):
    from mach_runtime.cli.main import main

    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _mlx_lm(argv, capsys, monkeypatch, cpu: bool = False):
    """mlx_lm.generate's output; ``cpu``: on the CPU stream (its ``--kv-bits`` attention needs a quantized_matmul
    MLX 0.32.4 CUDA lacks: tests/test_backend_faults.py)."""
    import importlib

    g = importlib.import_module("mlx_lm.generate")  # (``mlx_lm.generate`` the attribute is a function)
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", ["mlx_lm.generate", *argv])
        if cpu:
            f = g.stream_generate
            m.setattr(f, "__defaults__", tuple(mx.cpu if d is g.generation_stream else d for d in f.__defaults__))
        g.main()
    return capsys.readouterr().out


def test_defaults_are_mlx_lms():
    """The defaults of every shared flag equal mlx-lm 0.32.2's (read from its own parser)."""
    import argparse

    from mlx_lm.generate import setup_arg_parser

    ours = gen.build_parser(argparse.ArgumentParser())
    theirs = setup_arg_parser()
    shared = {"max_tokens", "temp", "top_p", "min_p", "top_k", "seed", "extra_eos_token", "system_prompt",
              "ignore_chat_template", "verbose", "max_kv_size", "kv_bits", "kv_group_size", "quantized_kv_start",
              "prefill_step_size", "draft_model", "min_tokens_to_keep"}
    for dest in shared:
        assert ours.get_default(dest) == theirs.get_default(dest), dest
    flags = {s for a in theirs._actions for s in a.option_strings}
    for f in ("--model", "--prompt", "-p", "--max-tokens", "-m", "--system-prompt", "--ignore-chat-template",
              "--draft-model", "--num-draft-tokens", "--kv-bits", "--max-kv-size", "--extra-eos-token", "--verbose"):
        assert f in flags and ours._option_string_actions.get(f) is not None, f


@pytest.mark.parametrize("extra", [
    [], ["--ignore-chat-template"], ["--system-prompt", "You write Python."],
    ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0", "--ignore-chat-template"],
    ["--max-kv-size", "12", "--ignore-chat-template"],
], ids=["chat-default", "raw", "system", "kv-bits", "max-kv-size"])
def test_output_equals_mlx_lm_generate(tiny32, capsys, monkeypatch, extra):
    """fp32 checkpoint (mlx-lm's CPU gather_mm is fp32-only): mach generate prints what mlx_lm.generate prints
    (greedy; sampled output follows mach's keyed sampler, equal to ``Runtime.stream(seed=)``: tests/test_sampling.py)."""
    argv = ["--model", str(tiny32), "--prompt", "def add(a, b):\\n", "-m", "16", "--verbose", "False", *extra]
    want = _mlx_lm(argv, capsys, monkeypatch, cpu="--kv-bits" in extra and tol.CUDA)
    code, got, _ = _mach(argv, capsys)
    assert code == 0 and got == want and got.strip()


def test_prompt_from_stdin_and_positional_checkpoint(capsys, monkeypatch):
    code, from_stdin, _ = _mach([DEMO, "-p", "-", "-m", "8", "--verbose", "False"], capsys, "def add(a, b):",
                                monkeypatch)
    assert code == 0
    code, direct, _ = _mach(["--model", DEMO, "-p", "def add(a, b):", "-m", "8", "--verbose", "False"], capsys)
    assert from_stdin == direct


def test_extra_eos_token_stops(tiny_dir, capsys):
    from mlx_lm.generate import generate_step

    from mach_runtime import load_moe

    model, tok, store, _ = load_moe(tiny_dir)
    prompt = tok.encode("def add(a, b):")
    ids = [t for (t, _), _ in zip(generate_step(mx.array(prompt), model), range(12))]
    store.close()
    stop = ids[5]
    first = ids.index(stop)
    word = tok._tokenizer.convert_ids_to_tokens(stop)
    argv = ["--model", str(tiny_dir), "-p", "def add(a, b):", "--ignore-chat-template", "-m", "12", "--verbose", "False"]
    code, cut, _ = _mach([*argv, "--extra-eos-token", word], capsys)
    assert code == 0 and cut == tok.decode(ids[:first]) + "\n"


def test_verbose_output_and_residency_flags(capsys):
    code, out, err = _mach(["--model", str(HF_QWEN3_MOE), "-p", "def f(x):", "-m", "6", "--streaming",
                            "--expert-cache-gb", "0.0001"], capsys)
    assert code == 0
    assert out.startswith("==========\n") and "Generation: 6 tokens" in out and "Prompt: " in out
    assert "hit rate" in err and "generated 6 tok" in err


def test_bad_flags_are_clear_errors(capsys):
    for argv, msg in ((["--kv-bits", "7"], "--kv-bits"), (["--max-tokens", "0"], "--max-tokens"),
                      (["--draft-model", DEMO, "--kv-bits", "4"], "cannot be combined"),
                      ([DEMO, "--model", str(HF_QWEN3_MOE)], "two checkpoints")):
        code, _, err = _mach(argv, capsys)
        assert code == 2 and msg in err and "Traceback" not in err


def _closed_pipe(args):
    """Runs a CLI whose stdout's reader is already gone: its first write fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-c", f"import sys; from {args[0]} import main; sys.exit(main({args[1:]!r}))"],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(w)
    return p


@pytest.mark.parametrize("args", [
    ["mach_runtime.cli.archs", "--json"], ["mach_runtime.cli.archs"],
    ["mach_runtime.cli.check", str(HF_QWEN3_MOE), "--json"],
    ["mach_runtime.cli.main", "check", str(HF_QWEN3_MOE)],
    ["mach_runtime.cli.main", "generate", str(HF_QWEN3_MOE), "-m", "2", "--verbose", "False"],
], ids=["archs-json", "archs", "check", "mach-check", "generate"])
def test_closed_pipe_exits_quietly(args):
    p = _closed_pipe(args)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141


def test_draft_models_keep_greedy_output(tiny32, capsys):
    """--draft-model: a DFlash draft runs mach's block speculative decoding, a plain model mlx-lm's draft-model
    decoding; greedy output equals decoding without a draft either way."""
    from mach_runtime.assets import demo_model_path

    dflash = str(demo_model_path().parent / "demo-qwen3-moe-dflash")
    base = ["--model", DEMO, "-p", "def add(a, b):", "--ignore-chat-template", "-m", "16", "--verbose", "False"]
    _, plain, _ = _mach(base, capsys)
    code, drafted, _ = _mach([*base, "--draft-model", dflash], capsys)
    assert code == 0 and drafted == plain and plain.strip()
    base = ["--model", str(tiny32), "-p", "def add(a, b):", "--ignore-chat-template", "-m", "12", "--verbose", "False"]
    _, plain, _ = _mach(base, capsys)
    code, drafted, _ = _mach([*base, "--draft-model", str(tiny32), "--num-draft-tokens", "2"], capsys)
    assert code == 0 and drafted == plain
