"""Memory traffic of a compiled step, read off XLA's optimised program.

On a CPU these steps are memory bound: what a step costs is mostly how many
times its kernels sweep over the parameters. This module counts it from
`compiled.as_text()`, deterministically (no clock involved): every kernel of
the program (a fusion, a library call, a copy, any unfused operation) reads
its operands and writes its result, and the bytes of both are summed.

* Buffers passed by reference cost nothing: parameters, constants, bitcasts,
  tuples and their elements.
* A `conditional` costs its cheapest branch (a guard whose expensive branch
  runs only on rare inputs costs nothing on the usual ones).
* A `while` body is counted once (there are none in the steps measured).
* An operand that a fusion reads only through a slice (of it, or of an
  elementwise result of it) costs the slice.

XLA's own `cost_analysis()["bytes accessed"]` counts every branch of a
conditional, which is why it is not used here. `collectives` lists the
cross-device operations of a program and the bytes each one produces.

>>> import jax, jax.numpy as jnp
>>> compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(1000)).compile()
>>> bytes_moved(compiled)  # one read and one write of 4000 bytes
8000
"""

from __future__ import annotations

import re

_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|"
    r"collective-permute|reduce-scatter)(-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_FREE = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all"}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 0)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """`'(f32[2], s32[]) tuple(%a, %b)'` -> the shape and what follows it."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _parse(text: str) -> tuple[dict[str, list[dict]], str]:
    """Computation name -> its instructions; and the entry computation's name."""
    computations: dict[str, list[dict]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        body = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
        if current is None or not body:
            continue
        shape, tail = _split_shape(body.group(2))
        opcode, _, args = tail.partition("(")
        # Operands are the %names before the closing parenthesis of the call.
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        current.append(
            {
                "name": body.group(1),
                "bytes": _shape_bytes(shape),
                "opcode": opcode.strip(),
                "operands": re.findall(r"%([\w.\-]+)", args[:end]),
                "branches": re.findall(
                    r"%([\w.\-]+)", _attribute(args[end:], "branch_computations")
                ),
                "body": re.findall(r"%([\w.\-]+)", _attribute(args[end:], "body")),
                "calls": re.findall(r"%([\w.\-]+)", _attribute(args[end:], "calls")),
                "index": int(args[:end]) if opcode.strip() == "parameter" else None,
            }
        )
    return computations, entry


def _attribute(attrs: str, key: str) -> str:
    match = re.search(key + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
    return match.group(1) if match else ""


def _traffic(computations: dict[str, list[dict]], name: str) -> int:
    instructions = computations.get(name, [])
    size = {i["name"]: i["bytes"] for i in instructions}
    total = 0
    for i in instructions:
        if i["opcode"] in _FREE:
            continue
        if i["opcode"] == "conditional":
            total += min((_traffic(computations, b) for b in i["branches"]), default=0)
        elif i["opcode"] == "while":
            total += sum(_traffic(computations, b) for b in i["body"])
        else:
            read = _operand_bytes(computations, i)
            total += i["bytes"] + sum(
                read.get(k, size.get(o, 0)) for k, o in enumerate(i["operands"])
            )
    return total


def _operand_bytes(computations, fusion) -> dict[int, int]:
    """Bytes a fusion reads of each operand, where it reads only a slice."""
    if fusion["opcode"] != "fusion" or not fusion["calls"]:
        return {}
    body = computations.get(fusion["calls"][0], [])
    users: dict[str, list[dict]] = {}
    for i in body:
        for o in i["operands"]:
            users.setdefault(o, []).append(i)
    fraction: dict[str, float] = {}

    def needed(i) -> float:
        # The fraction of `i`'s elements that the fusion's result depends on.
        if i["name"] not in fraction:
            fraction[i["name"]] = max(
                (
                    needed(u) * (u["bytes"] / max(i["bytes"], 1) if u["opcode"] == "slice" else 1)
                    for u in users.get(i["name"], [])
                ),
                default=1.0,
            )
        return fraction[i["name"]]

    return {i["index"]: int(i["bytes"] * needed(i)) for i in body if i["opcode"] == "parameter"}


def bytes_moved(compiled) -> int:
    """Bytes read and written by the kernels of a compiled program (see module doc)."""
    computations, entry = _parse(compiled.as_text())
    return _traffic(computations, entry)


def kernel_count(compiled) -> int:
    """Kernels the compiled program launches per step (fusions, library calls, copies...).

    XLA:CPU compiles each one separately, so compile time grows with it.

    >>> import jax, jax.numpy as jnp
    >>> kernel_count(jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(1000)).compile())  # one fusion
    1
    """
    computations, entry = _parse(compiled.as_text())
    return sum(i["opcode"] not in _FREE for i in computations[entry])


def peak_bytes(compiled) -> int:
    """Peak memory of a compiled program: arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def memory(compiled, param_bytes: int) -> dict[str, float]:
    """`memory_analysis` figures (MB) and the traffic in passes over the parameters."""
    mb = 2**20
    m = compiled.memory_analysis()
    peak = peak_bytes(compiled)
    return {
        "temp_mb": m.temp_size_in_bytes / mb,
        "argument_mb": m.argument_size_in_bytes / mb,
        "output_mb": m.output_size_in_bytes / mb,
        "alias_mb": m.alias_size_in_bytes / mb,
        "peak_mb": peak / mb,
        "passes": _passes(compiled, param_bytes),
    }


def _passes(compiled, param_bytes: int) -> float:
    try:
        return bytes_moved(compiled) / param_bytes
    except (KeyError, ValueError):  # a program text this parser does not read (another backend)
        return float("nan")


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collective op -> {"count", "bytes"} in a compiled program's text.

    `bytes` sums the shapes each collective produces on one device (for an
    all-gather the gathered array, for an all-reduce the reduced one); an
    async pair (`-start`/`-done`) counts once, at its start.

    >>> collectives("  %a = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add")
    {'all-reduce': {'count': 1, 'bytes': 32}}
    """
    found: dict[str, dict[str, int]] = {}
    for line in hlo.splitlines():
        # Long tuple shapes carry `/*index=5*/` comments, whose "=" would cut the match.
        m = _COLLECTIVE.search(re.sub(r"/\*.*?\*/", "", line))
        if m:
            entry = found.setdefault(m.group(2), {"count": 0, "bytes": 0})
            shape = m.group(1)
            if m.group(3) and m.group(2) in ("all-gather", "collective-permute"):
                # The async start returns (operand, result): count the result.
                shape = list(_ARRAY.finditer(shape))[-1].group(0)
            entry["count"] += 1
            entry["bytes"] += _shape_bytes(shape)
    return found
