"""Three ways a request ends early, each freeing its batch slot before the next decode step.

    python examples/cancellation.py [CHECKPOINT]
"""

import sys

import anyio

from mach_runtime import Runtime


async def main(checkpoint=None):
    async with Runtime.open(checkpoint, max_batch=4) as rt:
        # 1. leave the async for early
        async for i, chunk in _enumerate(rt.stream("def long_function():", max_tokens=500)):
            if i == 5:
                break
        # 2. a deadline cancels the consuming task
        with anyio.move_on_after(0.2):
            async for _ in rt.stream("class Big:", max_tokens=500):
                pass
        # 3. abort by request id from elsewhere
        stream = rt.stream("import this", max_tokens=500, request_id="to-abort")
        await stream.__anext__()
        await rt.abort("to-abort")
        last = [c async for c in stream]
        print("explicit abort finish_reason:", last[-1].finish_reason if last else "abort")
        await anyio.sleep(0.05)
        s = await rt.stats()
        print(f"aborted={s.decoder.aborted} active={s.decoder.active} live={s.live_requests}")


async def _enumerate(aiter):
    i = 0
    async for x in aiter:
        yield i, x
        i += 1


if __name__ == "__main__":
    anyio.run(main, *(sys.argv[1:2]))
