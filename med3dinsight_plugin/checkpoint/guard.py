"""The allocation guard: a network built from a file's description may not allocate far more than the file holds."""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError
from ..fileio import storage_id
from .format import Checkpoint


class _OverBudget(Exception):
    """Raised inside a network's constructor; deliberately not a ValueError/TypeError that builders re-wrap."""


class _AllocationGuard(TorchFunctionMode):
    """Refuses, before it happens, any allocation that takes the elements allocated so far past ``budget``: each
    tensor-creating call is first run on the meta device to learn its output size."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget, self.used, self.tripped = budget, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tripped:
            raise _OverBudget()
        n = _new_elements(func, args, kwargs)
        if n:
            self.used += n
            if self.used > self.budget:
                self.tripped = True
                raise _OverBudget()
        return func(*args, **kwargs)


def _new_elements(func, args, kwargs) -> int:
    """Elements of new memory ``func(*args, **kwargs)`` would allocate (views and in-place results excluded)."""
    from torch.utils._pytree import tree_flatten, tree_map

    name = getattr(func, "__name__", "")
    if name.startswith("__i") or name in ("__get__", "__set__", "__setitem__") or (
            name.endswith("_") and not name.endswith("__")):
        return 0  # attribute access and in-place operations allocate nothing
    inputs = set()
    try:
        if func in _constructors():
            out = func(*args, **{**kwargs, "device": "meta"})
        else:
            if not any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
                return 0

            def to_meta(a):
                if isinstance(a, torch.Tensor):
                    m = a.detach().to("meta")
                    inputs.add(id(m))
                    return m
                return a
            out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    except Exception:  # not computable on meta (data-dependent, e.g. .item()): allocates nothing of note
        return 0
    return sum(t.numel() for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor) and not t._is_view() and id(t) not in inputs)


def _constructors():
    from torch.utils._device import _device_constructors
    return _device_constructors()


@contextlib.contextmanager
def allocation_guard(ckpt: Checkpoint, factor: int = 4, slack: int = 1 << 24):
    """Build networks from ``ckpt``'s metadata inside this context: a network (or anything) whose construction
    would allocate more than ``factor`` times the values stored in the file plus ``slack`` elements is refused
    before the allocation, with a one-line :class:`CheckpointError`. A small file whose metadata claims huge widths
    or depths thus never makes its claimed network."""
    tensors = list(ckpt.state_dict.values()) + [t for part in ckpt.extras.values() for t in part.values()]
    values = sum({storage_id(t): t.numel() for t in tensors}.values())
    guard = _AllocationGuard(factor * values + slack)
    message = (f"{ckpt.path}: its metadata describes a network of more than {guard.budget / 1e6:.0f}M values, far "
               f"more than the {values / 1e6:.2f}M stored in the file, so it was not built: the metadata does not "
               f"belong to these weights; re-save the checkpoint with save_pretrained")
    try:
        with guard:
            yield
    except BaseException:
        if guard.tripped:
            raise CheckpointError(message) from None
        raise
    if guard.tripped:  # a builder swallowed the refusal
        raise CheckpointError(message)
