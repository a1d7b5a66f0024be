"""The base of the event-loop actors (ExpertStore, Cache): a mailbox, fire-and-forget and request/reply.

An actor owns its state and is reachable only through its mailbox. ``deliver`` never blocks (the Decoder's
thread reaches actors through ``call_soon`` + ``deliver``); ``ask`` awaits a reply. If the actor crashes while
handling an ``ask``, the asker gets ``RuntimeFailedError`` instead of waiting forever; the Supervisor rebuilds the
actor around the same mailbox.
"""

from __future__ import annotations

import inspect

import anyio

from mach_runtime.errors import RuntimeFailedError


class AsyncActor:
    name = "actor"
    mailbox_size = 1024

    def __init__(self):
        self.fault_hook = None  # set by the Supervisor: fault_hook(actor, point, info); tests crash actors here
        self.dropped = 0  # fire-and-forget messages dropped because the mailbox was full
        self._send, self._recv = anyio.create_memory_object_stream(self.mailbox_size)

    def adopt_mailbox(self, old: "AsyncActor") -> None:
        """Takes over a crashed predecessor's mailbox (senders keep reaching the actor by name)."""
        self._send, self._recv = old._send, old._recv

    def deliver(self, msg) -> None:
        """Fire-and-forget, never blocks (event-loop thread); drops the message if the mailbox is full."""
        try:
            self._send.send_nowait((msg, None))
        except anyio.WouldBlock:
            self.dropped += 1

    async def ask(self, msg):
        reply_send, reply_recv = anyio.create_memory_object_stream(1)
        await self._send.send((msg, reply_send))
        async with reply_recv:
            try:
                return await reply_recv.receive()
            except anyio.EndOfStream:
                raise RuntimeFailedError(f"the {self.name} actor crashed while handling {type(msg).__name__}") from None

    async def run(self) -> None:
        await self.serve()

    async def serve(self) -> None:
        """Handles the mailbox until it closes; ``handle`` may return an awaitable (an async reply)."""
        async for msg, reply in self._recv:
            try:
                if self.fault_hook is not None:
                    self.fault_hook(self.name, "message", {"type": type(msg).__name__})
                result = self.handle(msg)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException:
                if reply is not None:
                    reply.close()  # the asker gets an error, not a hang
                raise
            if reply is not None:
                async with reply:
                    await reply.send(result)

    def close_mailbox(self) -> None:
        self._send.close()

    def handle(self, msg):
        raise NotImplementedError
