"""The only place pytree registration happens.

`pytree_dataclass` turns a class into a frozen dataclass registered with JAX: fields are children
(arrays, nested pytrees or None) unless declared with `static()`, in which case they are part of the
tree structure (hashable, compared by value, a change triggers a recompile).
"""

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def static(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that is static metadata, not a pytree leaf."""
    metadata = {"static": True}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Frozen dataclass registered as a JAX pytree (static fields via `static()`)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        (meta if f.metadata.get("static", False) else data).append(f.name)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` re-exported so callers need one import."""
    return dataclasses.replace(obj, **changes)
