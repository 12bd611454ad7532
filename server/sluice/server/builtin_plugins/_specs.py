"""What the built-in plugins share: picking the tensor an option names, with errors that list the choices."""

from __future__ import annotations

from collections.abc import Sequence

from sluice.server.plugins import LoadError, TensorSpec


def listing(specs: Sequence[TensorSpec]) -> str:
    """'pixels' (FP32 [-1, 64]), 'mask' (BOOL [-1, 64])"""
    return ", ".join(f"'{s.name}' ({s.describe()})" for s in specs)


def choose(
    specs: Sequence[TensorSpec],
    name: str | None,
    *,
    plugin: str,
    option: str,
    kind: str,
    candidates: Sequence[TensorSpec] | None = None,
    candidate_kind: str = "",
) -> TensorSpec:
    """The spec called `name`; when `name` is unset, the only one of `candidates` (every spec by default).

    `kind` words what the specs are in messages ("input", "output"); `candidate_kind` words the candidates
    ("floating-point ") when they are a subset.
    """
    if name is not None:
        for spec in specs:
            if spec.name == name:
                return spec
        raise LoadError(
            f"{plugin}: {option} = '{name}': there is no {kind} of that name; "
            f"the {kind}s are {listing(specs)}"
        )
    pool = specs if candidates is None else candidates
    if len(pool) == 1:
        return pool[0]
    found = f"{len(pool)} {candidate_kind}{kind}s" if pool else f"no {candidate_kind}{kind}"
    raise LoadError(
        f"{plugin}: found {found} and cannot tell which to use; "
        f"set `{option}` to one of {listing(pool or specs)}"
    )
