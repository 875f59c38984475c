"""The Python examples of the README and the guide pages run as written."""

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The guides that hold what used to be README sections; their examples are
# complete programs. (composition/nonfinite show fragments of a training
# loop, multihost a multi-process launch: read, not run.)
GUIDES = [ROOT / "docs" / f"{name}.md" for name in ("routing", "layouts", "stacked", "equinox")]
ROUTING = ROOT / "docs" / "routing.md"


def python_blocks(page: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert python_blocks(), "README.md should show at least one Python example"


def test_quickstart_runs_and_constraints_hold():
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    violations = namespace["oc"].constraint_violations(
        namespace["params"], namespace["constraints"], namespace["labels"]
    )
    assert set(violations) == {"kernel", "bias"}
    assert all(float(v) <= 1e-6 for v in violations.values()), violations
    kernel = namespace["params"]["layers_0"]["kernel"]
    assert float(jnp.linalg.norm(kernel, axis=0).max()) <= 2.0 * (1 + 1e-6)


def test_every_python_block_runs_on_its_own():
    # Each block in a fresh namespace, as a reader pasting it into a new session.
    blocks = python_blocks()
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README} (python block {i})", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("page", [p for p in GUIDES if python_blocks(p)], ids=lambda p: p.name)
def test_every_guide_python_block_runs_on_its_own(page):
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page} (python block {i})", "exec"), {"__name__": "__guide__"})


def _labels_by_path(namespace, params):
    from optax_constraints._labels import resolve_labels

    return {leaf.path_str: label for leaf, label in resolve_labels(params, namespace["labels"])}


def test_rule_list_routes_attention_and_norm_layers_as_the_readme_says():
    # The "one rule list for every Keras argument" block, on its Linen and NNX
    # models (attention, LayerNorm named by Linen and as `ln_f` in NNX): q/k/v
    # kernels get axis=0 ("fan_in" would take one norm over inputs and heads),
    # the attention output kernel per output unit, norm biases beta (not the
    # plain-bias NonNeg), norm scales gamma.
    from flax import nnx

    namespace: dict = {}
    block = next(b for b in python_blocks(ROUTING) if "class NNXModel" in b)
    exec(compile(block, str(ROUTING), "exec"), namespace)
    linen = _labels_by_path(namespace, namespace["linen_params"])
    nnx_labels = _labels_by_path(namespace, nnx.state(namespace["nnx_model"], nnx.Param))
    attention = "MultiHeadDotProductAttention_0"
    expected = {
        **{f"{attention}/{p}/kernel": "qkv" for p in ("query", "key", "value")},
        f"{attention}/out/kernel": "kernel",
        f"{attention}/query/bias": "bias",
        "LayerNorm_0/bias": "beta",
        "LayerNorm_0/scale": "gamma",
        "Embed_0/embedding": "embeddings",
        "LSTMCell_0/hf/kernel": "recurrent",
        "LSTMCell_0/if/kernel": "kernel",
        "SeparableConv_0/depthwise/kernel": "depthwise",
        "Dense_0/bias": "bias",
    }
    assert {k: linen.get(k) for k in expected} == expected
    expected_nnx = {
        **{f"attn/{p}/kernel": "qkv" for p in ("query", "key", "value")},
        "attn/out/kernel": "kernel",
        "ln_f/bias": "beta",
        "ln_f/scale": "gamma",
        "rnn/cell/dense_h/kernel": "recurrent",
        "rnn/cell/dense_i/kernel": "kernel",
        "head/bias": "bias",
    }
    assert {k: nnx_labels.get(k) for k in expected_nnx} == expected_nnx
    constraints = namespace["constraints"]
    assert constraints["qkv"].axis == 0 and constraints["kernel"].axis == "fan_in"
    # The same rules match the names GPT-style code gives its norms.
    params = {name: {"bias": jnp.zeros(3)} for name in ("ln1", "ln_f", "attn_norm", "norm")}
    assert set(_labels_by_path(namespace, params).values()) == {"beta"}
