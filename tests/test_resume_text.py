"""A request that moves between engines (or is replayed after a crash) keeps its streamed text exact: text held
back for a partial stop-string match at the move is released, or cut at the stop, by the engine it moves to, as
if nothing had moved. Checked for the three engines a request can move into: the speculative engine (solo lane),
the target-only BatchEngine and the BatchedSpecDecoder, against one uninterrupted run with the same stop string."""

from __future__ import annotations

import pytest

from actors.messages import SamplingParams
from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, load_moe
from mach_runtime.assets import demo_model_path
from mach_runtime.engine.batch import Admission, BatchEngine
from mach_runtime.engine.specdec.batched import BatchedSpecDecoder, SpecParams
from tests.helpers import detokenize

DEMO = demo_model_path()
N = 40


@pytest.fixture(scope="module", params=["completes", "breaks"])
def setup(request):
    """(model, tokenizer, spec engine, prompt ids, greedy completion, stop string, split token k). The stop string
    starts with the last 2 characters of the first k completion tokens' text (so they are held back at the move)
    and "completes": goes on as the text does (the output stops there), or "breaks": goes on otherwise (the held
    characters must be released after the move)."""
    model, tok, _, _ = load_moe(DEMO, expert_residency="stacked")
    eng = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode="target_only"))
    prompt = tok.encode("def main():\n    parser = argparse.ArgumentParser(")
    full = [t for ch in eng.generate(prompt, max_tokens=N, ignore_eos=True) for t in ch.token_ids]
    text = detokenize(tok, full)
    for k in range(6, N - 6):
        cut = len(detokenize(tok, full[:k]))
        if request.param == "completes":
            stop = text[cut - 2 : cut + 3]
            ok = len(stop) == 5 and text.find(stop) == cut - 2 and cut + 3 <= len(detokenize(tok, full[: k + 1]))
        else:
            stop = text[cut - 2 : cut] + "\x00\x01"
            ok = cut >= 2 and stop not in text
        if ok and stop[:2].strip():
            return model, tok, eng, prompt, full, stop, k
    pytest.fail("no usable split point in the demo continuation")


def _reference(setup):
    _, _, eng, prompt, _, stop, _ = setup
    chunks = list(eng.generate(prompt, max_tokens=N, stop=[stop], ignore_eos=True))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def _first_part(setup):
    """Streams the first k tokens one step at a time and stops there (the run is moved away, not finished):
    (tokens, text delivered, characters delivered)."""
    _, _, eng, prompt, _, stop, k = setup
    run = eng.generate(prompt, max_tokens=N, stop=[stop], ignore_eos=True)
    toks, text = [], ""
    while len(toks) < k:
        c = next(run)
        toks += c.token_ids
        text += c.text
    sent = run.sent_chars
    run.close()
    assert sent == len(text) < len(detokenize(setup[1], toks))  # the stop string's first 2 chars are held back
    return toks, text, sent


def test_spec_engine_resumes_held_back_text(setup):
    _, tok, eng, prompt, _, stop, _ = setup
    ref_toks, ref_text = _reference(setup)
    toks, text, sent = _first_part(setup)
    # None: the old behaviour (all of the delivered tokens' text counted as sent), which lost held-back text that
    # did not complete a stop string
    completes = stop in detokenize(tok, setup[4])
    for chars, exact in ((sent, True), (None, completes)):
        chunks = list(eng.generate(prompt, resume_ids=toks, resume_chars=chars, max_tokens=N - len(toks),
                                   stop=[stop], ignore_eos=True))
        rest = [t for c in chunks for t in c.token_ids]
        assert toks + rest == ref_toks
        assert (text + "".join(c.text for c in chunks) == ref_text) is exact


def test_batch_engine_resumes_held_back_text(setup):
    model, tok, _, prompt, _, stop, _ = setup
    ref_toks, ref_text = _reference(setup)
    toks, text, sent = _first_part(setup)
    be = BatchEngine(model, tok, max_batch=2)
    be.eos = frozenset()
    be.add_many([Admission("r", tuple(prompt), SamplingParams(max_tokens=N, stop=(stop,)),
                           resume_ids=tuple(toks), resume_chars=sent)])
    out, finish = [], None
    while finish is None:
        for o in be.step():
            out.append(o)
            finish = o.finish_reason
    assert finish in ("stop", "length") and toks + [o.token for o in out] == ref_toks
    assert text + "".join(o.text for o in out) == ref_text


def test_batched_spec_decoder_resumes_held_back_text(setup):
    model, tok, _, prompt, _, stop, _ = setup
    ref_toks, ref_text = _reference(setup)
    toks, text, sent = _first_part(setup)
    dec = BatchedSpecDecoder(model, tok, config=BlockSpecDecEngineConfig(mode="prompt_lookup", block_size=4,
                                                                        policy="fixed"), max_batch=2)
    params = SpecParams(max_tokens=N, stop=(stop,), specdec="prompt_lookup", ignore_eos=True)
    dec.add_many([Admission("r", tuple(prompt), params, resume_ids=tuple(toks), resume_chars=sent)])
    out, done = [], False
    while not done:
        for o in dec.step():
            out.append(o)
            done = done or o.finish_reason is not None
    assert toks + [t for o in out for t in o.token_ids] == ref_toks
    assert text + "".join(o.text for o in out) == ref_text
