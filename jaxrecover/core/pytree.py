"""The only place pytree registration happens.

`pytree_dataclass` turns a class into a frozen dataclass registered with JAX: fields are children
(arrays, nested pytrees or None) unless declared with `static()`, in which case they are part of the
tree structure (hashable, compared by value, a change triggers a recompile).

Unflattening rebuilds instances WITHOUT calling ``__init__`` (as equinox does): JAX unflattens with
placeholder leaves (``None`` in ``in_axes`` prefixes, stacked arrays under ``vmap``, tracers), which
must not meet the constructor's validation or the jaxtyping field checks meant for users.
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
    data_t, meta_t = tuple(data), tuple(meta)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        children = [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data_t]
        return children, tuple(getattr(obj, n) for n in meta_t)

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(obj, n) for n in data_t], tuple(getattr(obj, n) for n in meta_t)

    def unflatten(aux: tuple[Any, ...], children: Any) -> Any:
        obj = object.__new__(cls)
        for n, v in zip(meta_t, aux):
            object.__setattr__(obj, n, v)
        for n, v in zip(data_t, children):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
