"""Params profiles: overlays (profiles/<name>.yaml) that move params.yaml to another setting, e.g. real data.

A profile lists only the keys it changes; `apply_profile` merges it into params.yaml's values (the
merged file must validate; tests/test_profiles.py checks every shipped profile). From the shell:

    python -m lib.core.profile profiles/imagenet.yaml | xargs dvc exp run      # as DVC overrides (-S)
    python -m lib.core.profile profiles/imagenet.yaml --write params.imagenet.yaml   # a merged file

The first prints one `-S key=value` pair per line (`+key=value` for keys params.yaml lacks; values in
JSON, which DVC's override grammar reads), quoted for xargs. The second writes the merged params for
stages run by hand (`python -m stages <stage> --params params.imagenet.yaml`); comments are not kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lib.core.params import DEFAULT_PARAMS, Params, load_params

__all__ = ["apply_profile", "overrides", "profile_params"]


def apply_profile(base: Mapping[str, Any], profile: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `profile`'s keys replacing its own, section by section (mappings merge, other values
    and empty mappings replace)."""
    merged = dict(base)
    for key, value in profile.items():
        if isinstance(value, Mapping) and value and isinstance(merged.get(key), Mapping):
            merged[key] = apply_profile(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_params(profile: str | Path, base: str | Path = DEFAULT_PARAMS) -> Params:
    """The validated params of `profile` applied to the params file `base` (e.g. for benchmarks)."""
    merged = apply_profile(yaml.safe_load(Path(base).read_text()) or {}, yaml.safe_load(Path(profile).read_text()) or {})
    return Params.model_validate(merged)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _has(tree: Mapping[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True


def overrides(base: Mapping[str, Any], profile: Mapping[str, Any]) -> list[str]:
    """The profile as DVC `-S` overrides: `key=<JSON value>`, `+key=...` where `base` lacks the key."""
    return [f"{'' if _has(base, key) else '+'}{key}={json.dumps(value)}" for key, value in _leaves(profile)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Apply a params profile (see lib/core/profile.py).")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--base", type=Path, default=DEFAULT_PARAMS, help="params file the profile changes")
    parser.add_argument("--write", type=Path, default=None, help="write the merged, validated params here")
    args = parser.parse_args()
    base = yaml.safe_load(args.base.read_text()) or {}
    profile = yaml.safe_load(args.profile.read_text()) or {}
    merged = apply_profile(base, profile)
    try:
        Params.model_validate(merged)  # fail before writing anything
    except ValidationError as error:
        raise SystemExit(f"{args.profile} on {args.base}: invalid params\n{error}") from None
    if args.write is None:
        for item in overrides(base, profile):
            print(f"-S {shlex.quote(item)}")
        return
    args.write.write_text(yaml.safe_dump(merged, sort_keys=False))
    load_params(args.write)


if __name__ == "__main__":
    main()
