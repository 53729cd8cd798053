"""Contracts for recipes (recipe.py) and step configs (config.py): parse, defaults, hash, one-line errors with file:line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from effspec.config import config_from_dict, config_to_dict
from effspec.errors import UserError
from effspec.recipe import DEFAULT_MEASURES as MEASURES, CalibrationSpec, builtin_recipes, load_recipe, parse_recipe
from effspec.registry import all_steps
from effspec.steps.prune.magnitude import MagnitudeConfig
from effspec.steps.quantize.rtn import RTNConfig

FULL = """\
name: w4-then-sparse
calibration: {data: calib.txt, samples: 8, seqlen: 128, seed: 3}
steps:
  - rtn: {bits: 4, group_size: 32, symmetric: false}
  - magnitude:
      nm: "2:4"
measure: [perplexity, size]
"""


def test_valid_recipe_parses_every_part() -> None:
    r = parse_recipe(FULL, "full.yaml")
    assert r.name == "w4-then-sparse"
    assert r.steps == (("rtn", RTNConfig(bits=4, group_size=32, symmetric=False)), ("magnitude", MagnitudeConfig(nm="2:4")))
    assert r.measures == ("perplexity", "size")
    assert r.calibration == CalibrationSpec(data="calib.txt", samples=8, seqlen=128, seed=3)
    assert r.text == FULL
    rtn_part, magnitude_part = r.describe_steps().split(" -> ")
    assert rtn_part.startswith("rtn(") and "group_size=32" in rtn_part and "symmetric=False" in rtn_part
    assert magnitude_part.startswith("magnitude(") and "nm=2:4" in magnitude_part


def test_recipe_round_trips_through_its_canonical_yaml() -> None:
    r = parse_recipe(FULL, "full.yaml")
    canon = r.canonical()
    again = parse_recipe(yaml.safe_dump({"name": r.name, **canon, "measure": list(r.measures),
                                         "calibration": config_to_dict(r.calibration)}), "again.yaml")
    assert again.steps == r.steps
    assert again.measures == r.measures
    assert again.calibration == r.calibration
    assert again.hash == r.hash


def test_defaults_are_filled_in() -> None:
    r = parse_recipe("steps:\n  - rtn\n  - magnitude: {}\n", "d.yaml", default_name="from-file")
    assert r.name == "from-file"
    assert r.steps == (("rtn", RTNConfig()), ("magnitude", MagnitudeConfig()))
    assert (r.steps[0][1].bits, r.steps[0][1].group_size, r.steps[0][1].symmetric) == (4, 64, True)
    assert r.measures == MEASURES
    assert r.calibration == CalibrationSpec(data=None, samples=32, seqlen=2048, seed=0)


def test_empty_recipe_is_the_baseline() -> None:
    r = parse_recipe("", "empty.yaml", default_name="empty")
    assert (r.name, r.steps, r.measures) == ("empty", (), MEASURES)


def test_hash_ignores_spelled_out_defaults_and_the_name() -> None:
    short = parse_recipe("name: a\nsteps:\n  - rtn: {bits: 4}\n", "a.yaml")
    spelled = parse_recipe(
        "name: b\nsteps:\n  - rtn: {bits: 4, group_size: 64, symmetric: true, targets: ['*'], ignore: [lm_head]}\n"
        "measure: [perplexity, speed, size]\n", "b.yaml")
    bare = parse_recipe("steps: [rtn]\n", "c.yaml")
    assert short.hash == spelled.hash == bare.hash
    assert re.fullmatch(r"[0-9a-f]{16}", short.hash)


@pytest.mark.parametrize("changed", [
    "steps:\n  - rtn: {bits: 8}\n",
    "steps:\n  - rtn: {group_size: 32}\n",
    "steps:\n  - rtn: {symmetric: false}\n",
    "steps:\n  - rtn: {ignore: []}\n",
    "steps:\n  - rtn: {}\n  - magnitude: {}\n",
])
def test_hash_changes_when_a_field_changes(changed: str) -> None:
    assert parse_recipe(changed, "x.yaml").hash != parse_recipe("steps:\n  - rtn: {}\n", "y.yaml").hash


def test_hash_depends_on_step_order() -> None:
    a = parse_recipe("steps:\n  - rtn: {}\n  - magnitude: {}\n", "a.yaml")
    b = parse_recipe("steps:\n  - magnitude: {}\n  - rtn: {}\n", "b.yaml")
    assert a.hash != b.hash


def test_data_free_recipe_hash_ignores_calibration() -> None:
    a = parse_recipe("steps: [rtn]\n", "a.yaml")
    b = parse_recipe("steps: [rtn]\ncalibration: {samples: 4, seed: 9}\n", "b.yaml")
    assert a.hash == b.hash


# ---- errors: one line, file:line, the field -------------------------------------------------------
ERRORS = [
    # (id, yaml, line, fragments the message must contain)
    ("malformed-yaml", "name: x\nsteps: []\nmeasure: [size]]\n", 3, ["malformed YAML"]),
    ("unknown-top-field", "name: x\nsteps: []\nmesure: [size]\n", 3, ["unknown field 'mesure'"]),
    ("unknown-step", "name: x\nsteps:\n  - rtn: {bits: 4}\n  - rtnn: {bits: 4}\n", 4, ["steps[1]", "unknown step 'rtnn'"]),
    ("unknown-step-field", "name: x\nsteps:\n  - rtn: {bitz: 4}\n", 3, ["steps[0].rtn", "bitz"]),
    ("wrong-type", 'name: x\nsteps:\n  - rtn: {bits: "four"}\n', 3, ["steps[0].rtn.bits", "'four'", "int"]),
    ("bool-for-int", "name: x\nsteps:\n  - rtn: {bits: true}\n", 3, ["steps[0].rtn.bits", "True"]),
    ("impossible-bits", "name: x\nsteps:\n  - rtn: {group_size: 32}\n  - rtn: {bits: 5}\n", 4,
     ["steps[1].rtn.bits", "5", "(2, 3, 4, 8)"]),
    ("negative-group", "name: x\nsteps:\n  - rtn: {group_size: -8}\n", 3, ["steps[0].rtn.group_size", "-8"]),
    ("bad-nm", 'name: x\nsteps:\n  - magnitude: {nm: "3:2"}\n', 3, ["steps[0].magnitude.nm", "'3:2'"]),
    ("sparsity-one", "name: x\nsteps:\n  - magnitude: {sparsity: 1.0}\n", 3, ["steps[0].magnitude.sparsity", "1.0"]),
    ("bad-measure", "name: x\nsteps: []\nmeasure: [perplexity, latency]\n", 3, ["measure", "latency"]),
    ("calibration-samples-0", "name: x\nsteps: []\ncalibration: {samples: 0, seqlen: 64}\n", 3,
     ["calibration.samples", "0", "at least 1"]),
    ("steps-not-list", "name: x\nsteps: {rtn: {}}\n", 2, ["steps"]),
]


@pytest.mark.parametrize("text,line,fragments", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_recipe_errors_are_one_line_with_file_line_and_field(tmp_path: Path, text: str, line: int, fragments: list[str]) -> None:
    path = tmp_path / "bad-recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_block_style_field_error_points_at_the_field_line() -> None:
    text = "name: x\nsteps:\n  - rtn:\n      group_size: 64\n      bits: four\n"
    with pytest.raises(UserError) as e:
        parse_recipe(text, "block.yaml")
    assert str(e.value).startswith("block.yaml:5: steps[0].rtn.bits"), str(e.value)


def test_load_recipe_builtin_name() -> None:
    r = load_recipe("rtn-w4-g64")
    assert r.name == "rtn-w4-g64"
    assert r.steps == (("rtn", RTNConfig(bits=4, group_size=64, symmetric=True)),)
    assert load_recipe("baseline").steps == ()


def test_load_recipe_file_name_is_the_default_name(tmp_path: Path) -> None:
    path = tmp_path / "my-quant.yaml"
    path.write_text("steps:\n  - rtn: {bits: 8, group_size: 0}\n")
    r = load_recipe(str(path))
    assert r.name == "my-quant"
    assert r.steps == (("rtn", RTNConfig(bits=8, group_size=0)),)


def test_load_recipe_missing_file_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as e:
        load_recipe(str(missing))
    assert str(missing) in str(e.value)
    assert "rtn-w4-g64" in str(e.value)  # lists the builtins


def test_every_builtin_recipe_parses_and_is_named_after_its_file() -> None:
    builtins = builtin_recipes()
    assert {"baseline", "rtn-w4-g64", "rtn-w8", "magnitude-2of4"} <= set(builtins)
    hashes = set()
    for name in builtins:
        r = load_recipe(name)
        assert r.name == name
        hashes.add(r.hash)
    assert len(hashes) == len(builtins)  # no two builtins mean the same run


@pytest.mark.parametrize("name", sorted(all_steps()))
def test_every_step_config_round_trips(name: str) -> None:
    cls = all_steps()[name].config
    default = cls()
    assert config_from_dict(cls, config_to_dict(default)) == default
    assert config_from_dict(cls, yaml.safe_load(yaml.safe_dump(config_to_dict(default)))) == default
    assert config_from_dict(cls, None) == default
    with pytest.raises(ValueError, match="no_such_field"):
        config_from_dict(cls, {"no_such_field": 1})


def test_float_fields_accept_ints_and_stay_floats() -> None:
    cfg = config_from_dict(MagnitudeConfig, {"sparsity": 0})
    assert cfg.sparsity == 0.0 and isinstance(cfg.sparsity, float)
