"""The non-expert weights of a checkpoint (attention, norms, router, embeddings, head): which tensors they are, how
they reach the MLX model, and the background read that overlaps them with the rest of ``load_moe`` (P7).

``load_moe`` starts a ``Prefetch`` as soon as it knows which tensors are non-experts (right after the safetensors
headers and the expert layout). Its thread evaluates MLX's own ``mx.load`` arrays of those tensors, file by file in
file order, while the main thread loads the tokenizer, builds the model, quantizes it and wires the expert bank.
The main thread builds everything over its own lazy ``mx.load`` arrays (``_Tensors``, never evaluated for a tensor
the model keeps as stored) and, as the very last step, ``_Tensors.settled`` puts the thread's evaluated array in
place of each lazy one the model keeps unchanged. A tensor the model does not keep as stored (a float cast, FP8 /
FP4 dequantization, a family's ``sanitize`` rewriting it) stays a lazy graph over the file and is evaluated from it
afterwards, as without the prefetch; ``load_moe`` skips the prefetch when a float cast applies (every floating
tensor would be derived). The arrays are MLX's own reads, so the model holds exactly what ``mx.load`` gives.

Threads: the read runs on the process's one load thread (``load_thread.py``: a thread per load leaked an OS thread
of MLX's each time); it builds and evaluates only its own arrays (MLX >= 0.31.2 gives each thread its own streams),
and the main thread touches them only after the read has finished (``Prefetch.arrays`` waits for it).
"""

from __future__ import annotations

import sys
import threading

from ..errors import CheckpointError
from . import load_thread
from .quant_formats import _SCALE_SUFFIXES, dequantize_released
from .safetensors_index import CheckpointIndex

_CHUNK_BYTES = 64 << 20  # evaluated per mx.eval call: bounds how long a cancel waits
_DEQUANTIZED = ("F8_E4M3", "I8")  # released FP8 / FP4 weights: dequantized at load (quant_formats), never kept


class Prefetch:
    """Reads the named tensors on the load thread (MLX's ``mx.load``, evaluated in file order, ``_CHUNK_BYTES`` at
    a time); ``arrays()`` waits for it and gives ``{name on disk: evaluated array}`` or raises what the read raised."""

    def __init__(self, index: CheckpointIndex, names):
        infos = sorted((index[n] for n in names), key=lambda t: (t.file, t.offset))
        self._chunks: list[list] = []
        for t in infos:
            last = self._chunks[-1] if self._chunks else None
            if last and last[0].file == t.file and sum(x.nbytes for x in last) + t.nbytes <= _CHUNK_BYTES:
                last.append(t)
            else:
                self._chunks.append([t])
        self._arrays: dict = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        load_thread.submit(self._run)

    def _run(self) -> None:
        try:
            import mlx.core as mx

            loaded, loaded_file = None, None
            for chunk in self._chunks:
                if self._stop.is_set():
                    return
                if chunk[0].file != loaded_file:
                    # MLX reads files on its CPU stream on every backend; named, so this thread needs no stream of
                    # its own on an accelerator
                    loaded, loaded_file = mx.load(chunk[0].file, stream=mx.cpu), chunk[0].file
                arrays = [loaded[t.name] for t in chunk]
                mx.eval(arrays)
                self._arrays.update((t.name, a) for t, a in zip(chunk, arrays))
        except BaseException as e:  # noqa: BLE001  (handed to the main thread by arrays())
            self._error = e
        finally:
            self._done.set()

    def arrays(self) -> dict:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._arrays

    def cancel(self) -> None:
        """Stops after the chunk being read (the load failed elsewhere) and waits for the read to end."""
        self._stop.set()
        self._done.wait()
        self._arrays = {}


def prefetched_names(index: CheckpointIndex, names) -> list[str]:
    """The names worth reading ahead: all but released FP8 / FP4 weights and their scales, which are dequantized
    at load (the arrays kept are derived from them)."""
    skip = set()
    for n in names:
        if n.endswith(".weight") and index[n].dtype in _DEQUANTIZED:
            base = n[: -len(".weight")]
            skip.update([n, *(base + s for s in _SCALE_SUFFIXES)])
    return [n for n in names if n not in skip]


class _Tensors:
    """Lazy ``mx.load`` of every shard, opened once; arrays are read from disk only when evaluated. With a
    ``Prefetch``, ``settled`` swaps a tensor kept as stored for the prefetch thread's evaluated array."""

    def __init__(self, index: CheckpointIndex, prefetch: Prefetch | None = None):
        self.index = index
        self.prefetch = prefetch
        self._files: dict[str, dict] = {}
        self._given: dict[int, tuple[str, object]] = {}  # id(lazy array) -> (name, the array: keeps the id unique)

    def __getitem__(self, name: str):
        import mlx.core as mx

        f = self.index[name].file
        if f not in self._files:
            self._files[f] = mx.load(f)
        a = self._files[f][name]
        self._given[id(a)] = (name, a)
        return a

    def settled(self, a):
        """``a``, or the prefetched evaluated array of the same tensor when ``a`` is that tensor as stored."""
        hit = self._given.get(id(a))
        if self.prefetch is None or hit is None or hit[1] is not a:
            return a
        return self.prefetch.arrays().get(hit[0], a)


def non_expert_names(index: CheckpointIndex, expert_names, adapter, config: dict, keep=None) -> dict[str, str]:
    """{name the MLX model's sanitize expects: name in the checkpoint} of the text model's non-expert tensors (all
    but ``expert_names``); vision / audio tower tensors are skipped with one log line. ``keep(name)``: pipeline
    parallel, this rank's."""
    names = [n for n in index.names() if n not in expert_names]
    skipped = [n for n in names if n.startswith(adapter.skipped_prefixes)] if adapter.skipped_prefixes else []
    if skipped:
        towers = sorted({p for p in adapter.skipped_prefixes for n in skipped if n.startswith(p)})
        print(f"[mach] skipping {len(skipped)} non-text tensors ({', '.join(p + '*' for p in towers)}) of "
              f"{index.directory}: mach_runtime serves the text model", file=sys.stderr)
    rename = adapter.rename_for(config) or (lambda n: n)
    drop = set(skipped)
    out = {rename(n): n for n in names if n not in drop}
    return {k: n for k, n in out.items() if keep is None or keep(k)}


def _quantize_non_experts(model, config: dict, weights: dict) -> None:
    quant = config.get("quantization")
    if not quant:
        return
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    def predicate(path, module):
        if isinstance(quant.get(path), dict):
            return quant[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quant.get("group_size", 64),
        bits=quant.get("bits", 4),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_non_experts(model, index: CheckpointIndex, names: dict[str, str], tensors: _Tensors, config, swapped,
                     cast) -> None:
    """Sanitizes, quantizes (the checkpoint's quantization) and checks the non-expert weights against the model,
    then loads them; ``names`` from ``non_expert_names``; ``swapped``: the module paths of the expert blocks."""
    from mlx.utils import tree_flatten

    raw = dequantize_released({n: tensors[n] for n in names.values()}, index, config)  # keyed by names on disk
    weights = {k: raw[n] for k, n in names.items() if n in raw}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize_non_experts(model, config, weights)
    expected = {
        k: v.shape for k, v in tree_flatten(model.parameters()) if not any(k.startswith(p + ".") for p in swapped)
    }
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{index.directory}: weights do not match the {config.get('model_type')} model built from "
            f"config.json: {'; '.join(detail)}"
        )
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            where = index[k].file if k in index else str(index.directory)
            raise CheckpointError(
                f"{where}: tensor {k!r} has shape {list(weights[k].shape)}, the model expects {list(shape)}; "
                "config.json and the weights do not match"
            )
    model.load_weights([(k, tensors.settled(cast(v))) for k, v in weights.items()], strict=False)
