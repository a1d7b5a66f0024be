"""The concurrency layer (anyio + msgspec): actors that own the engine's pieces and exchange messages.

Filled in by the actor-runtime work; the engine in ``mach_runtime`` is usable on its own meanwhile.
"""
