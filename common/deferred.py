"""Inference items whose "nothing found" error waits until the run (issue 26: configs build with no data).

MONAI's ``check_properties`` (the model zoo's ``verify_bundle_properties``, MONAI Label) instantiates an
inference config's ``dataset`` and ``evaluator`` on a machine with no input. A ``datalist`` expression that
raises when it finds nothing would stop that; returning ``[]`` silently would let a run do nothing. So the
config builds the items through :class:`DeferredItems`, which keeps the error, and the run list starts with
``"$@datalist.require()"``, which raises it (the same :class:`common.errors.InputError`, naming the path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from common.errors import InputError


class DeferredItems(Sequence):
    """``find(*args, **kwargs)``'s items; empty when it raised :class:`InputError`, kept for :meth:`require`."""

    def __init__(self, find: Callable[..., Sequence[dict]], *args: Any, **kwargs: Any):
        try:
            self.items, self.error = list(find(*args, **kwargs)), None
        except InputError as e:
            self.items, self.error = [], e

    def require(self) -> DeferredItems:
        """Self, or the error ``find`` raised (a run with nothing to infer stops, naming the input)."""
        if self.error is not None:
            raise self.error
        return self

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
