"""How users call the public API, for the type checker (pyright, in CI).

Not a test module: pytest imports it (doctest collection) but runs nothing;
`usage` is only type-checked. Every call here must check clean, and the
`assert_type` lines pin what the public signatures promise. Wrong calls are in
tests/test_types.py, which asserts that pyright rejects each of them.
"""

from typing import Any, assert_type

import jax
import jax.numpy as jnp
import optax

import optax_constraints as oc


def usage() -> None:
    @oc.register(package="typecheck")
    class Halve(oc.Constraint):
        def __call__(self, w: jax.Array) -> jax.Array:
            return w / 2

    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    constraints = {"kernel": oc.MaxNorm(2.0, axis="fan_in"), "bias": oc.NonNeg()}
    labels = oc.label_by_path({"**/kernel": "kernel", "**/bias": "bias"})

    tx = optax.chain(optax.adam(1e-3), oc.project(constraints, labels, every_k_steps=2))
    assert_type(oc.project(oc.UnitNorm()), optax.GradientTransformation)
    assert_type(
        oc.project({"k": lambda w: jnp.clip(w, 0, 1)}, {"dense": "k"}), optax.GradientTransformation
    )
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
    params = optax.apply_updates(params, updates)

    projected = oc.apply_constraints(params, constraints, labels)
    violations = oc.constraint_violations(projected, constraints, labels)
    assert_type(violations["kernel"], jax.Array)
    assert_type(oc.routing_report(params, constraints, labels), str)
    assert_type(oc.glob_match("**/kernel", "Dense_0/kernel"), bool)

    assert_type(oc.MaxNorm(optax.linear_schedule(4.0, 1.0, 100)).at_step(10), oc.MaxNorm)
    assert_type(oc.MaxNorm.from_config({"max_value": 2.0, "axis": 0}), oc.MaxNorm)
    assert_type(oc.serialize(Halve()), dict[str, Any])
    assert_type(Halve()(jnp.ones(3)), jax.Array)
    oc.deserialize(oc.serialize(oc.SpectralNorm(1.0, method="svd")))
    oc.get("max_norm")

    assert_type(oc.projections.max_norm(jnp.ones((4, 3)), 2.0, axis="fan_in"), jax.Array)
    assert_type(oc.projections.resolve_axis("fan_in", 4), tuple[int, ...])
