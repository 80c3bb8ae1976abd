"""Checks the comparison stages run before any work."""

from lib.core.errors import UserError
from lib.core.params import Params


def check_toy_world(config: Params) -> None:
    """Counterfactual images, and so true effects, need a scene renderer: only the toy world has one."""
    if config.data.kind != "toy":
        raise UserError(
            f"counterfactual images need a scene renderer, which only the toy world has (data.kind is {config.data.kind!r})",
            key="data.kind", fix="use data.kind: toy, or leave the counterfactuals and compare stages out",
        )
