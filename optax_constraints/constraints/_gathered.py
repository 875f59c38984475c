"""`Gathered`: a constraint run on the whole leaf inside `jax.shard_map`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_constraints.constraints._base import Constraint

Spec = tuple[tuple[str, ...], ...]
"""Per axis of a local block, the mesh axes that split it (`()`: not split)."""


class Gathered(Constraint):
    """`constraint` on the assembled leaf; each device keeps its own block.

    What `param_specs` runs for a constraint without an `on_shards` form
    (matrix, simplex, custom ones): exact, at the cost of one whole leaf per
    device while it is projected. A state (`SpectralNorm`'s vector) is the
    whole leaf's, the same on every device.
    """

    def __init__(self, constraint: Constraint, spec: Spec):
        self.constraint, self.spec = constraint, spec

    def _gather(self, x):
        # Each block at its place in zeros, summed over the devices: exact, and,
        # unlike `all_gather`, typed the same on every device, so loops inside the
        # constraint (power method, simplex threshold) carry one type.
        shape, start = list(x.shape), []
        for axis, names in enumerate(self.spec):
            shape[axis] *= math.prod(jax.lax.axis_size(n) for n in names)
            start.append(jax.lax.axis_index(names) * x.shape[axis] if names else 0)
        whole = jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x, start)
        return jax.lax.psum(whole, tuple(n for names in self.spec for n in names))

    def _block(self, x, like):
        for axis, names in enumerate(self.spec):
            if names:
                n = like.shape[axis]
                x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(names) * n, n, axis)
        return x

    def at_step(self, step):
        return Gathered(self.constraint.at_step(step), self.spec)

    def __call__(self, w):
        return self._block(self.constraint(self._gather(w)), w)

    def init_state(self, w):
        return self.constraint.init_state(self._gather(w))

    def apply(self, w, state, step):
        out, state = self.constraint.apply(self._gather(w), state, step)
        return self._block(out, w), state

    def violation(self, w):
        return self.constraint.violation(self._gather(w))

    def tangent(self, w, u):
        return self._block(self.constraint.tangent(self._gather(w), self._gather(u)), u)
