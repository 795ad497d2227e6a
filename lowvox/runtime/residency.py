"""Low-VRAM residency: weights live in (pinned) RAM and visit the GPU only while used.

A `Residency` keeps one storage copy of every parameter and buffer of the modules it
manages. While a request runs (`with residency.active(): ...`) the modules' tensors point at
compute-device copies; afterwards they point back at the storage copies, so nothing is
copied back (inference never changes weights) and the GPU memory is freed.

Two granularities:
- "request": everything moves to the compute device when a request starts.
- "layer": the modules in `layers` (the transformer blocks) stay in storage and move one at
  a time, just before their forward, and back right after; only the rest moves per request.
  For GPUs where even one request's worth of weights does not fit.

The logic is device-agnostic: with storage and compute both "cpu" (or compute "meta") it
runs, and is tested, without a GPU; `moves` counts the transfers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

GRANULARITIES = ("request", "layer")


class Residency:
    """Moves `modules` between `storage` and `compute` around each request (see module doc)."""

    def __init__(
        self,
        modules: nn.Module | Sequence[nn.Module],
        storage: str | torch.device = "cpu",
        compute: str | torch.device = "cuda",
        granularity: str = "request",
        layers: Sequence[nn.Module] = (),
        pin: bool | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.storage = torch.device(storage)
        self.compute = torch.device(compute)
        self.layers = list(layers)
        # Pinned host memory makes host->GPU copies asynchronous and faster.
        self.pin = (self.compute.type == "cuda") if pin is None else pin
        self.moves = 0  # tensors copied to the compute device so far
        self._depth = 0
        self._lock = threading.RLock()
        self._stored: dict[tuple[int, str], torch.Tensor] = {}
        self._owners: list[tuple[nn.Module, str, bool]] = []  # (module, name, is_parameter)
        for module in self._all_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                self._own(module, name, param, True)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    self._own(module, name, buffer, False)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.granularity = ""
        self.set_granularity(granularity)

    # -- bookkeeping -------------------------------------------------------------------------

    def _all_modules(self) -> Iterator[nn.Module]:
        seen: set[int] = set()
        for root in self.modules:
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    yield m

    def _own(self, module: nn.Module, name: str, t: torch.Tensor, is_param: bool) -> None:
        stored = t.detach().to(self.storage)
        if self.pin and stored.device.type == "cpu" and not stored.is_pinned():
            stored = stored.pin_memory()
        self._stored[(id(module), name)] = stored
        self._owners.append((module, name, is_param))
        _set(module, name, stored, is_param)

    def _place(self, modules: set[int] | None, device: torch.device | None) -> None:
        """Point the tensors of `modules` (ids; None: all) at `device` copies (None: storage).
        A visit is counted even when `device` is the storage device (then `.to` copies
        nothing): that is how the CPU-only tests see what would move."""
        for module, name, is_param in self._owners:
            if modules is not None and id(module) not in modules:
                continue
            stored = self._stored[(id(module), name)]
            if device is None:
                _set(module, name, stored, is_param)
            else:
                _set(module, name, stored.to(device, non_blocking=self.pin), is_param)
                self.moves += 1

    # -- granularity -------------------------------------------------------------------------

    def set_granularity(self, granularity: str) -> None:
        """Switch between whole-request and layer-by-layer moves (between requests)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        with self._lock:
            if self._depth:
                raise RuntimeError("cannot change residency granularity during a request")
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            if granularity == "layer" and not self.layers:
                raise ValueError("layer-by-layer residency needs the layers to move")
            if granularity == "layer":
                for layer in self.layers:
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_in))
                    self._hooks.append(layer.register_forward_hook(self._layer_out))
            self.granularity = granularity

    def _layer_module_ids(self, layer: nn.Module) -> set[int]:
        return {id(m) for m in layer.modules()}

    def _layer_in(self, layer: nn.Module, args: object) -> None:
        if self._depth:
            self._place(self._layer_module_ids(layer), self.compute)

    def _layer_out(self, layer: nn.Module, args: object, output: object) -> None:
        if self._depth:
            self._place(self._layer_module_ids(layer), None)

    # -- requests ----------------------------------------------------------------------------

    def _request_module_ids(self) -> set[int]:
        every = {id(m) for m in self._all_modules()}
        if self.granularity == "request":
            return every
        in_layers = set().union(*(self._layer_module_ids(layer) for layer in self.layers))
        return every - in_layers

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The modules are usable on the compute device inside; re-entrant."""
        with self._lock:
            if self._depth == 0:
                self._enter()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._place(None, None)
                    _free(self.compute)

    def _enter(self) -> None:
        try:
            self._place(self._request_module_ids(), self.compute)
        except torch.OutOfMemoryError:
            self._place(None, None)
            if self.granularity == "layer" or not self.layers:
                raise
            # Even one request's weights do not fit: from now on, one layer at a time.
            log.warning("the model does not fit on %s: moving it layer by layer", self.compute)
            _free(self.compute)
            self.set_granularity("layer")
            self._enter()
        except BaseException:
            self._place(None, None)
            raise

    @property
    def busy(self) -> bool:
        return self._depth > 0

    def close(self) -> None:
        """Remove the hooks; the modules stay on the storage device."""
        with self._lock:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []


def _set(module: nn.Module, name: str, t: torch.Tensor, is_param: bool) -> None:
    if is_param:
        module._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[name] = t


def _free(device: torch.device) -> None:
    """Give the GPU memory the caching allocator holds back to the driver."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
