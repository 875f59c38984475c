"""Matrix projections on sharded kernels: lay out contractions, or gather one leaf.

Norm and elementwise projections need nothing here: their reductions run as
local partial sums plus an all-reduce of the per-unit sums, on `Explicit`
and `Auto` mesh axes alike (docs/multihost.md). Power iteration and
Newton-Schulz contract the kernel over its fan-in axes in place; under
`Explicit` axes each contraction is told where its result lives
(`out_sharding`), so the kernel stays sharded. An SVD needs the
`(fan_in, out)` matrix itself: under `Explicit` axes the reshape to that
view has no sharding JAX can express, so the leaf is gathered first (only
that leaf, only inside the projection) and the result is given the input's
sharding again.
"""

from __future__ import annotations

import jax
from jax.core import Tracer
from jax.sharding import NamedSharding, PartitionSpec


def _sharding(x):
    """The sharding in `x`'s type, or `None` when `x` lives on one device."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    if sharding.mesh.size == 1:
        return None
    return sharding


def _explicit(sharding) -> bool:
    return any(axes is not None for axes in sharding.spec)


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axis names in one `PartitionSpec` entry: None, a name, or a tuple."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def padded_spec(sharding: NamedSharding, ndim: int) -> tuple:
    """`sharding.spec` with one entry per axis of an `ndim`-array (None: not sharded)."""
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def shard_counts(x: jax.Array) -> tuple[int, ...]:
    """Per axis of `x`, in how many pieces its type shards it (1: not, or `Auto` axes).

    >>> import jax.numpy as jnp
    >>> shard_counts(jnp.ones((2, 3)))
    (1, 1)
    """
    sharding = _sharding(x)
    counts = [1] * x.ndim
    if sharding is not None:
        for i, entry in enumerate(sharding.spec):
            for name in _mesh_axes(entry):
                counts[i] *= sharding.mesh.shape[name]
    return tuple(counts)


def explicit_mesh_axes(x: jax.Array, axes: tuple[int, ...]) -> tuple[str, ...]:
    """The `Explicit` mesh axes that `x`'s type shards its `axes` over, in order.

    Empty when those axes are not sharded, sharded over `Auto` axes only,
    or `x` lives on one device.

    >>> import jax.numpy as jnp
    >>> explicit_mesh_axes(jnp.ones((2, 3)), (0,))
    ()
    """
    sharding = _sharding(x)
    if sharding is None:
        return ()
    spec = padded_spec(sharding, x.ndim)
    explicit = set(sharding.mesh.explicit_axes)
    return tuple(name for a in axes for name in _mesh_axes(spec[a]) if name in explicit)


def explicit_spec(x: jax.Array) -> tuple | None:
    """`x`'s `PartitionSpec`, one entry per axis, if its type shards it; else `None`.

    Only `Explicit` mesh axes are in an array's type: `None` also when `x`
    lives on one device or its mesh axes are `Auto`.

    >>> import jax.numpy as jnp
    >>> explicit_spec(jnp.ones((2, 3))) is None
    True
    """
    sharding = _sharding(x)
    if sharding is None or not _explicit(sharding):
        return None
    return padded_spec(sharding, x.ndim)


def on_mesh_of(like: jax.Array, entries: tuple) -> NamedSharding | None:
    """`entries` as a `NamedSharding` on `like`'s mesh, if `like`'s type shards it; else `None`.

    The `out_sharding=` of a contraction involving `like` (`None` leaves the
    choice to JAX, as on one device or on `Auto` axes).

    >>> import jax.numpy as jnp
    >>> on_mesh_of(jnp.ones((2, 3)), (None,)) is None
    True
    """
    if explicit_spec(like) is None:
        return None
    # Outside `jit` the concrete mesh: its devices place operands that live
    # on one device (the abstract mesh in the type names none).
    concrete = None if isinstance(like, Tracer) else getattr(like, "sharding", None)
    mesh = concrete.mesh if isinstance(concrete, NamedSharding) else jax.typeof(like).sharding.mesh
    return NamedSharding(mesh, PartitionSpec(*entries))


def laid_out(x: jax.Array, like: jax.Array, entries: tuple) -> jax.Array:
    """`x` resharded to `entries` on `like`'s mesh, if `like`'s type shards it; else `x`.

    >>> import jax.numpy as jnp
    >>> laid_out(jnp.ones(3), jnp.ones((3, 2)), (None,)).shape
    (3,)
    """
    sharding = on_mesh_of(like, entries)
    return x if sharding is None else jax.device_put(x, sharding)


def gathered(x: jax.Array) -> jax.Array:
    """`x` replicated, if its type shards it over `Explicit` mesh axes; else `x`.

    >>> import jax.numpy as jnp
    >>> gathered(jnp.ones(3)).shape
    (3,)
    """
    sharding = _sharding(x)
    if sharding is None or not _explicit(sharding):
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def sharded_like(out: jax.Array, x: jax.Array) -> jax.Array:
    """`out` (same shape as `x`) with `x`'s sharding, on `Explicit` or `Auto` axes.

    `Explicit` axes: `x`'s type says its sharding, `out` is resharded to it.
    `Auto` axes: the sharding is the compiler's choice, so `out` is tied to
    whatever `x` gets (`shard_alike`); without that, a gathered result stays
    replicated.

    >>> import jax.numpy as jnp
    >>> sharded_like(jnp.zeros(3), jnp.ones(3)).shape
    (3,)
    """
    sharding = _sharding(x)
    if sharding is None:
        return out
    if _explicit(sharding):
        return jax.sharding.reshard(out, sharding)
    from jax.experimental.shard_alike import shard_alike

    return shard_alike(x, out)[1]
