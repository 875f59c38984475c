"""Matrix projections on sharded kernels: lay out contractions, or gather one leaf."""

from __future__ import annotations

import jax
from jax.core import Tracer
from jax.sharding import NamedSharding, PartitionSpec


def _sharding(x):
    """The sharding in `x`'s type, or `None` when `x` lives on one device."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty or sharding.mesh.size == 1:
        return None
    return sharding


def _explicit(sharding) -> bool:
    return any(axes is not None for axes in sharding.spec)


def _mesh_axes(entry) -> tuple[str, ...]:  # a `PartitionSpec` entry: None, a name, or a tuple
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def padded_spec(sharding: NamedSharding, ndim: int) -> tuple:
    """`sharding.spec` with one entry per axis of an `ndim`-array (None: not sharded)."""
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def explicit_mesh_axes(x: jax.Array, axes: tuple[int, ...]) -> tuple[str, ...]:
    """The `Explicit` mesh axes that `x`'s type shards its `axes` over, in order."""
    sharding = _sharding(x)
    if sharding is None:
        return ()
    spec = padded_spec(sharding, x.ndim)
    explicit = set(sharding.mesh.explicit_axes)
    return tuple(name for a in axes for name in _mesh_axes(spec[a]) if name in explicit)


def explicit_spec(x: jax.Array) -> tuple | None:
    """`x`'s `PartitionSpec` entries, one per axis, if its type shards it; else `None`."""
    sharding = _sharding(x)
    if sharding is None or not _explicit(sharding):
        return None
    return padded_spec(sharding, x.ndim)


def on_mesh_of(like: jax.Array, entries: tuple) -> NamedSharding | None:
    """`entries` on `like`'s mesh if `like`'s type shards it (an `out_sharding=`); else `None`."""
    if explicit_spec(like) is None:
        return None
    # Outside `jit` the concrete mesh: its devices place operands that live
    # on one device (the abstract mesh in the type names none).
    concrete = None if isinstance(like, Tracer) else getattr(like, "sharding", None)
    mesh = concrete.mesh if isinstance(concrete, NamedSharding) else jax.typeof(like).sharding.mesh
    return NamedSharding(mesh, PartitionSpec(*entries))


def laid_out(x: jax.Array, like: jax.Array, entries: tuple) -> jax.Array:
    """`x` resharded to `entries` on `like`'s mesh, if `like`'s type shards it; else `x`."""
    sharding = on_mesh_of(like, entries)
    return x if sharding is None else jax.device_put(x, sharding)


def gathered(x: jax.Array) -> jax.Array:
    """`x` replicated, if its type shards it over `Explicit` mesh axes; else `x`."""
    sharding = _sharding(x)
    if sharding is None or not _explicit(sharding):
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def sharded_like(out: jax.Array, x: jax.Array) -> jax.Array:
    """`out` (same shape as `x`) with `x`'s sharding, on `Explicit` or `Auto` axes.

    On `Auto` axes the sharding is the compiler's choice, so `out` is tied to
    `x`'s with `shard_alike` (else a gathered result stays replicated).
    """
    sharding = _sharding(x)
    if sharding is None:
        return out
    if _explicit(sharding):
        return jax.sharding.reshard(out, sharding)
    from jax.experimental.shard_alike import shard_alike

    return shard_alike(x, out)[1]
