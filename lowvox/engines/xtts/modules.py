"""`TypedModuleList`: an `nn.ModuleList` that tells the type checker what it holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar, cast, overload

from torch import nn

M = TypeVar("M", bound=nn.Module)


class TypedModuleList(nn.ModuleList, Generic[M]):
    """An `nn.ModuleList` of modules of one type (`TypedModuleList[Block]`): iterating and
    indexing give that type, not `nn.Module`. Everything else, state-dict names included,
    is `nn.ModuleList`'s."""

    def __iter__(self) -> Iterator[M]:
        return cast(Iterator[M], super().__iter__())

    @overload
    def __getitem__(self, idx: slice) -> TypedModuleList[M]: ...

    @overload
    def __getitem__(self, idx: int) -> M: ...

    def __getitem__(self, idx: int | slice) -> M | TypedModuleList[M]:
        # A slice is a new list of this class (nn.ModuleList builds `self.__class__`).
        return cast("M | TypedModuleList[M]", super().__getitem__(idx))
