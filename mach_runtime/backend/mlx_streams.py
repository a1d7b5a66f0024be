"""Releasing a thread's MLX streams while Python still runs.

MLX keeps per-thread streams (and a worker thread for each stream a thread uses). Left to process exit they are torn
down in an order that could abort the interpreter ("terminate called without an active exception", ~1 exit in 4
of ``mach demo`` on the CPU build before this), and a thread that ends leaves MLX's worker behind
(``mx.clear_streams`` does not stop it: ``bench/open_close_leaks.py``). So MLX work runs on a few long-lived
threads (the Decoder's ``actors.decoder.MLXThread``, ``load_moe``'s reader ``io.load_thread``), and each calls
``release_streams`` as its last job before it ends.

The two threads keep their own job loops (8 lines each): the MLX thread's loop is on every request's path, which
issue 14 bounds to six of our files (``tests/test_request_path.py``).
"""

from __future__ import annotations


def release_streams(sync=None) -> None:
    """Waits for the calling thread's queued MLX work on ``sync`` (a device or stream; None: the default stream;
    ``mx.cpu`` for a thread that only reads into host arrays, so that it never creates a GPU stream) and destroys
    the streams the thread created."""
    import mlx.core as mx

    try:
        mx.synchronize() if sync is None else mx.synchronize(sync)
    finally:
        mx.clear_streams()
