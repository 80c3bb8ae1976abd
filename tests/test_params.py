"""Params: defaults validate, bad values and unknown keys fail with the key, value and rule."""

from pathlib import Path

import pytest
import yaml

from lib.core.params import Params, ParamsError, load_params, params_hash

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_validate() -> None:
    assert isinstance(load_params(REPO / "params.yaml"), Params)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"circles": {"radius": -3}}, r"circles\.radius: -3 — Input should be greater than 0"),
        ({"circles": {"radus": 3}}, r"circles\.radus: 3 — unknown key"),
        ({"circles": {"color": [255, 0, 300]}}, r"circles\.color: .* must be three integers in 0\.\.255"),
        ({"data": {"kind": "folder"}}, r"data\.kind: 'folder' — Input should be 'toy', 'imagefolder' or 'segfolder'"),
        ({"data": {"kind": "imagefolder"}}, r"data — kind 'imagefolder' needs an 'imagefolder' section"),
        ({"runtime": {"device": "gpu"}}, r"runtime\.device: 'gpu' — must be 'auto', 'cpu'"),
        ({"concepts": {"default_template": "a photo"}}, r"concepts\.default_template: 'a photo' — must contain exactly one"),
    ],
)
def test_bad_values_name_key_value_and_rule(tmp_path: Path, data: dict, expected: str) -> None:
    with pytest.raises(ParamsError, match=expected) as info:
        load_params(write(tmp_path, data))
    assert str(info.value).startswith(str(tmp_path / "params.yaml"))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, {"circles": {"radius": 0, "grid": -1}}))
    assert "circles.radius" in str(info.value) and "circles.grid" in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_params_hash_is_stable_and_sensitive() -> None:
    a, b = Params().circles, Params().circles.model_copy(update={"grid": 5})
    assert params_hash(a) == params_hash(Params().circles)
    assert params_hash(a) != params_hash(b)
