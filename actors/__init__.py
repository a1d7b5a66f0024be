"""The concurrency layer (anyio + msgspec): the Supervisor and the ExpertStore, Cache and Decoder actors around
the engine, and ``Runtime``, the embedded async API. Depends on ``mach_runtime``; ``mach_runtime`` never imports
it at import time (tests/test_imports.py).
"""
