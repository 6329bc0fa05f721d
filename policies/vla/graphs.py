"""CUDA graphs for the fixed-shape parts of a query.

At batch 1 a full-size query launches about two thousand small kernels, and Python issuing
them takes longer than the GPU running them. A CUDA graph records a function's kernels once
per input shape and replays them with one launch. ``Graphs.run(name, fn, *args)`` does that
for a pure function of its tensor arguments (weights are read in place, so the model must not
be moved or reloaded after a capture): the arguments are copied into the graph's static
inputs, the graph is replayed, and its outputs are cloned, so a later replay cannot overwrite
what a caller holds. Functions with data-dependent shapes or host reads (token selection
counts) stay outside, eager.

On a device without graphs (the CPU) the same bookkeeping runs, with the function called on
the static inputs instead of a replay, so the plumbing is tested everywhere. With
``check_host_reads`` the CPU path also fails a function that reads a tensor's values on the
host (a count, ``.item()``, ``nonzero``, a boolean mask index): on a GPU such a function
cannot be captured and would quietly run eagerly.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

_recording = 0  # depth of ``recording()`` contexts


@contextmanager
def recording():
    """Marks the calls that record a graph (and, without a GPU, the calls that stand in for a
    replay). Compiled kernels (``policies.vla.model.Speedups``) serve these calls only: called
    one by one, a compiled function costs more on the host than the eager operators it fuses
    (an H100 query took 79 ms eagerly with them against 31 ms without), while in a replay it
    costs nothing on the host."""
    global _recording
    _recording += 1
    try:
        yield
    finally:
        _recording -= 1


def is_recording() -> bool:
    return _recording > 0


@dataclass
class _Entry:
    inputs: tuple  # static input tensors (None where the argument was None)
    outputs: Any  # static outputs: a tensor or a tuple of tensors
    graph: Any = None  # torch.cuda.CUDAGraph, or None where the function is called instead
    device: Any = None  # the CUDA device it was captured on
    failed: bool = False  # a GPU capture that failed: the function runs as eager code


class Graphs:
    """One model's captured graphs, at most ``limit`` of them, sharing one memory pool."""

    def __init__(self, limit: int = 64, warmup: int = 2):
        self.limit = limit
        self.warmup = warmup
        self._entries: dict[tuple, _Entry] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0  # calls over the limit, run without a graph
        self.failures: list[str] = []  # captures that failed (that shape then runs eagerly)
        self.check_host_reads = False  # on the CPU: fail a function a GPU could not capture

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every captured graph (and its memory); the next calls capture anew."""
        self._entries.clear()
        self._pool = None

    def run(self, name: str, fn: Callable, *args: torch.Tensor | None):
        """``fn(*args)`` through the graph of (``name``, argument shapes, dtypes, devices).

        ``name`` must identify ``fn`` together with every non-tensor value it depends on.
        """
        key = (name,) + tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.limit:
                self.eager_calls += 1
                return fn(*args)
            entry = self._entries[key] = self._capture(fn, args)
            self.captures += 1
        else:
            for static, a in zip(entry.inputs, args):
                if static is not None:
                    static.copy_(a)
        if entry.graph is not None:
            with torch.cuda.device(entry.device):  # the capture's device, also on cuda:1 and beyond
                entry.graph.replay()
        elif entry.failed:  # the plain operators: compiled code called one by one is slower
            entry.outputs = fn(*entry.inputs)
        else:  # a CPU: run as a recording would, so tests see what a GPU would capture
            with HostReads(refuse=name) if self.check_host_reads else nullcontext(), recording():
                entry.outputs = fn(*entry.inputs)
        self.replays += 1
        return _clone(entry.outputs)

    def _capture(self, fn: Callable, args: tuple) -> _Entry:
        inputs = tuple(None if a is None else a.clone() for a in args)
        device = next((a.device for a in args if a is not None and a.device.type == "cuda"), None)
        if device is None:
            return _Entry(inputs, None)
        # If a library kernel refuses capture, try once more without cuDNN attention (the
        # other attention kernels capture), then give up on this shape: it runs eagerly.
        for without_cudnn in (False, True):
            try:
                with torch.cuda.device(device):
                    graph, outputs = self._record(fn, inputs, without_cudnn)
                return _Entry(inputs, outputs, graph, device)
            except RuntimeError as error:
                self.failures.append(f"{type(error).__name__}: {str(error)[:300]}")
                torch.cuda.synchronize(device)
        return _Entry(inputs, None, failed=True)

    def _record(self, fn: Callable, inputs: tuple, without_cudnn: bool):
        from torch.nn.attention import sdpa_kernel

        backends = sdpa_kernel(list(_attention_backends_but_cudnn())) if without_cudnn else nullcontext()
        with backends, recording():
            # Warm-up on a side stream, as capture requires (lazy library initialisation, workspaces).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = fn(*inputs)
        return graph, outputs

    def stats(self) -> dict:
        return {"graphs": len(self._entries), "captures": self.captures, "replays": self.replays,
                "eager_calls": self.eager_calls, "failures": list(self.failures)}


def _clone(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)


def graphable() -> bool:
    """Graphs serve inference only (a capture records no autograd history), and their static
    inputs, made under inference mode, may only be written under it."""
    return torch.is_inference_mode_enabled()


def _attention_backends_but_cudnn():
    from torch.nn.attention import SDPBackend

    return (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class HostReadError(RuntimeError):
    """A graphed function read tensor values on the host: a GPU capture of it would fail."""


class HostReads:
    """Counts the operators that need a tensor's values on the host (a count, ``.item()``,
    ``.tolist()``, ``.numpy()``, ``nonzero``, a boolean mask index, a copy from a GPU to the
    host). On a GPU each one waits for every queued kernel, so the host cannot run ahead of the
    GPU, and none can be captured in a graph.

    ``device`` (a device type) counts only reads of values that live there: on a GPU a value
    copied to the host once is then free to read. With ``refuse`` (a graph's name) the first
    read of any device raises ``HostReadError`` instead."""

    def __init__(self, device: str | None = None, refuse: str | None = None):
        self.device, self.refuse = device, refuse
        self.count = 0

    def _read(self, tensor: torch.Tensor, what) -> None:
        if self.refuse is not None:
            raise HostReadError(f"graph {self.refuse!r}: {what} needs tensor values on the host")
        if self.device is None or tensor.device.type == self.device:
            self.count += 1

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

        aten = torch.ops.aten
        reads = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.equal,
                 aten.masked_select, aten.unique_dim, aten._unique2, aten.unique_consecutive}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                boolean_index = func is aten.index.Tensor and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
                if func.overloadpacket in reads or boolean_index:
                    counter._read(args[0], func)
                source = copied_to_host(func, args, kwargs)
                if source is not None:
                    counter._read(source, func)
                return func(*args, **kwargs)

        self._originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def reader(name, original):
            def read(tensor, *args, **kwargs):
                counter._read(tensor, f"Tensor.{name}")
                with _disable_current_modes():  # one read, not its copy too
                    return original(tensor, *args, **kwargs)
            return read

        for name, original in self._originals.items():
            setattr(torch.Tensor, name, reader(name, original))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return self._mode.__exit__(*exc)


def copied_to_host(func, args: tuple, kwargs: dict):
    """The device tensor that the operator ``func`` copies to the host, or None. A copy from a
    GPU is seen as ``aten._to_copy``, as ``aten.to`` itself (``.cpu()`` under inference mode, on
    an H100 with PyTorch 2.11: ``to.dtype_layout``) or as ``copy_`` into a host tensor."""
    aten = torch.ops.aten
    if func is aten.copy_.default:
        source, target = args[1], args[0].device
    elif func.overloadpacket in (aten._to_copy, aten.to):
        source, target = args[0], kwargs.get("device")
        for arg in args[1:]:  # to.device gives the device, to.other a tensor on it
            target = target or (arg if isinstance(arg, (torch.device, str)) else getattr(arg, "device", None))
    else:
        return None
    on_device = getattr(source, "device", None) is not None and source.device.type not in ("cpu", "meta")
    return source if on_device and target is not None and torch.device(target).type == "cpu" else None
