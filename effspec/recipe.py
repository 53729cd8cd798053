"""Recipes: YAML lists of steps plus what to measure, parsed with the file and line of every mistake.

    name: rtn-w4g64                      # optional, defaults to the file name
    calibration: {data: PATH, samples: 32, seqlen: 2048, seed: 0}   # optional
    steps:                               # applied in order
      - rtn: {bits: 4, group_size: 64}
    measure: [perplexity, speed, size]   # optional; also tasks, kld

Step names and fields are the registry's names and the config dataclasses'
fields. A recipe's hash covers its steps with every config field filled in
(defaults included) and, when a step needs it, the calibration spec, so two
files that mean the same run share results in the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from effspec.config import config_from_dict, config_to_dict, expect
from effspec.errors import UserError
from effspec.registry import get_step

MEASURES = ("perplexity", "speed", "size", "tasks", "kld")
DEFAULT_MEASURES = ("perplexity", "speed", "size")
BUILTIN_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class CalibrationSpec:
    data: str | None = None  # None: --calib-data, else a part of the eval data disjoint from the scored windows
    samples: int = 32  # BENCHMARKS.md: 32 sequences of 2048 tokens, offsets from random.Random(0)
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        expect(self.samples >= 1, "samples", self.samples, "at least 1")
        expect(self.seqlen >= 2, "seqlen", self.seqlen, "at least 2")


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[tuple[str, object], ...]  # (registered step name, its frozen config)
    measures: tuple[str, ...] = DEFAULT_MEASURES
    calibration: CalibrationSpec = CalibrationSpec()
    text: str = ""  # the YAML as written, for reports

    @property
    def needs_calibration(self) -> bool:
        return any(get_step(name).needs_calibration for name, _ in self.steps)

    def canonical(self) -> dict:
        out: dict = {"steps": [{name: config_to_dict(cfg)} for name, cfg in self.steps]}
        if self.needs_calibration:
            out["calibration"] = config_to_dict(self.calibration)
        return out

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:16]

    def describe_steps(self) -> str:
        """One line, e.g. "rtn(bits=4, group_size=64, symmetric=True)"; module patterns only when not default."""
        parts = []
        for name, cfg in self.steps:
            default = config_to_dict(type(cfg)())
            many = len(default) > 10  # tuning configs: only what the recipe changed
            shown = {k: v for k, v in config_to_dict(cfg).items()
                     if default[k] != v or not (many or k in ("targets", "ignore"))}
            parts.append(f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})")
        return " -> ".join(parts)


def _lines(node: yaml.Node | None) -> dict:
    """key -> (line of the key, value node) for a YAML mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: (k.start_mark.line + 1, v) for k, v in node.value}


def parse_recipe(text: str, where: str, default_name: str = "recipe") -> Recipe:
    """Parse recipe YAML; every error is a UserError '<where>:<line>: <field>: <problem>'."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}:1: a recipe is a mapping with 'steps' (and optionally name, calibration, measure)")
    top = _lines(root)
    line = lambda key: top[key][0] if key in top else 1  # noqa: E731
    unknown = set(data) - {"name", "steps", "measure", "calibration"}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"{where}:{line(key)}: unknown field '{key}'; expected name, steps, calibration, measure")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}:{line('name')}: name: expected a non-empty string")
    steps_data = data.get("steps", [])
    if not isinstance(steps_data, list):
        raise UserError(f"{where}:{line('steps')}: steps: expected a list of '- step_name: {{field: value}}'")
    step_nodes = top["steps"][1].value if "steps" in top and isinstance(top["steps"][1], yaml.SequenceNode) else []
    steps = []
    for i, item in enumerate(steps_data):
        at = f"{where}:{step_nodes[i].start_mark.line + 1 if i < len(step_nodes) else line('steps')}"
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{at}: steps[{i}]: expected one 'step_name: {{field: value}}' mapping")
        (step_name, fields), = item.items()
        try:
            info = get_step(str(step_name))
        except UserError as e:
            raise UserError(f"{at}: steps[{i}]: {e}") from None
        try:
            steps.append((info.name, config_from_dict(info.config, fields)))
        except ValueError as e:
            step_node = _lines(step_nodes[i]).get(step_name, (0, None))[1] if i < len(step_nodes) else None
            field_lines = _lines(step_node)
            field = getattr(e, "field", "")
            if field in field_lines:
                at = f"{where}:{field_lines[field][0]}"
            raise UserError(f"{at}: steps[{i}].{step_name}.{e}") from None
    measures = data.get("measure", list(DEFAULT_MEASURES))
    if isinstance(measures, str):
        measures = [measures]
    if not isinstance(measures, list) or not all(m in MEASURES for m in measures):
        raise UserError(f"{where}:{line('measure')}: measure: got {measures!r}, expected a list from {', '.join(MEASURES)}")
    try:
        calibration = config_from_dict(CalibrationSpec, data.get("calibration"))
    except ValueError as e:
        calib_lines = _lines(top["calibration"][1]) if "calibration" in top else {}
        at = calib_lines[e.field][0] if getattr(e, "field", "") in calib_lines else line("calibration")
        raise UserError(f"{where}:{at}: calibration.{e}") from None
    return Recipe(name, tuple(steps), tuple(measures), calibration, text)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_recipe(spec: str) -> Recipe:
    """A recipe file path, or the name of a builtin recipe (see `effspec recipes`)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        builtin = builtin_recipes()
        if spec not in builtin:
            raise UserError(f"unknown recipe '{spec}': not a file, nor a builtin recipe ({', '.join(builtin)})")
        path = builtin[spec]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{spec}: cannot read recipe ({e})") from None
    return parse_recipe(text, str(spec), path.stem)
