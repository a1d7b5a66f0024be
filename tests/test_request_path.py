"""A request's path from ``Runtime.stream`` to the expert matmul reads through at most 6 of our files (issue 14;
the path is described in docs/architecture.md, "How a request flows").

Recorded, not asserted from a list: ``sys.setprofile`` on the event loop's thread records the files of
``mach_runtime`` and ``actors`` on the call stack when the request enters the Decoder's mailbox
(``Decoder.send``), and on the MLX thread the files on the call stack whenever an expert matmul runs
(``ExpertProjection.__call__``: ``gather_qmm`` / ``gather_mm``), for the prefill and the decode steps."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

import actors
import mach_runtime
from actors.decoder import Decoder
from mach_runtime import Runtime
from mach_runtime.io.gather_switch_glu import ExpertProjection

pytestmark = pytest.mark.anyio
ROOTS = (Path(mach_runtime.__file__).parent, Path(actors.__file__).parent)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class StackAt:
    """A profile function: the files of ours on the call stack each time one of ``fns`` is called."""

    def __init__(self, *fns):
        self.codes = {f.__code__ for f in fns}
        self.files: set[str] = set()
        self.hits = 0

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self.hits += 1
            while frame is not None:
                p = Path(frame.f_code.co_filename)
                for root in ROOTS:
                    if root in p.parents:
                        self.files.add(p.relative_to(root.parent).as_posix())
                frame = frame.f_back


async def test_a_request_reaches_the_expert_matmul_through_at_most_six_files(tiny_dir):
    matmul = StackAt(ExpertProjection.__call__)

    def hook(actor, point, info):  # called on the MLX thread
        if actor == "decoder" and point == "admit":
            sys.setprofile(matmul)  # this request's prefill and first decode step
        elif actor == "decoder" and point == "step":
            sys.setprofile(None)

    async with Runtime.open(tiny_dir, max_batch=2, expert_residency="stacked", fault_hook=hook) as rt:
        entry = StackAt(Decoder.send)
        stream = rt.stream("def add(a, b):", max_tokens=3)
        sys.setprofile(entry)
        try:
            with anyio.fail_after(60):
                await stream._start()  # the request goes into the ledger and the Decoder's mailbox
        finally:
            sys.setprofile(None)
        with anyio.fail_after(60):
            tokens = [t async for c in stream for t in c.token_ids]
    assert len(tokens) == 3 and entry.hits == 1 and matmul.hits > 0
    files = entry.files | matmul.files
    print("event loop:", sorted(entry.files), "MLX thread:", sorted(matmul.files))
    assert len(files) <= 6, sorted(files)
    assert {"actors/runtime.py", "actors/decoder.py", "mach_runtime/engine/scheduler.py",
            "mach_runtime/io/gather_switch_glu.py"} <= files
