"""The typed configuration of `persona-probe run`: one dataclass per stage, validated on load.

The pipeline YAML is these dataclasses written out; an unknown or mistyped key is a one-line error naming
the key (checked before any model loads). `dataclasses.asdict(cfg)` gives the same JSON as the YAML, which
is what stage keys hash, so a rerun recomputes only what a changed setting touches.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from persona_probe.core.errors import PersonaProbeError

_STRICT = ConfigDict(extra="forbid")
Layers = Union[str, int, list[Union[int, str]], None]


@dataclass(config=_STRICT)
class ModelConfig:
    model: str = "smollm2"  # a known name (`persona-probe models`), hub id or local folder
    adapter: Optional[str] = None  # a LoRA adapter folder (or hub id) applied on top
    device: str = "auto"
    dtype: str = "auto"


@dataclass(config=_STRICT)
class DirectionConfig:
    trait: str = "malicious"  # built-in trait (persona-probe direction --help lists them)
    position: str = "prompt_last"  # prompt_last | prompt_mean | response_mean
    layers: Layers = "all"
    n_questions: Optional[int] = None  # contrast questions used (None: all)
    n_prompts: Optional[int] = 3  # system-prompt pairs per question (None: all)
    test_frac: float = 0.25  # share of questions held out for the per-layer AUROC
    batch_size: int = 16


@dataclass(config=_STRICT)
class SteeringConfig:
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])
    layers: Layers = None  # None: the direction's selected layer
    unit: str = "resid"  # resid: alpha in units of the mean residual norm; raw: direction norm
    where: Literal["all", "response"] = "all"
    questions: str = "builtin:core"
    questions_limit: Optional[int] = None
    samples: int = 2
    max_new_tokens: int = 40
    temperature: float = 1.0
    include_random: bool = True  # a random direction of the same norm at every alpha
    batch_size: int = 32


@dataclass(config=_STRICT)
class RoutesConfig:
    persona: bool = False
    icl: bool = False


def _route_defaults() -> dict[str, dict[str, Any]]:
    return {"icl": {"ks": [0, 4, 16], "draws": 1, "n_samples": 1, "variants": ["none", "safety", "context"]},
            "persona": {"n_samples": 1}}


@dataclass(config=_STRICT)
class RouteSettings:
    """Keyword arguments of each route experiment (`icl_experiment`, `persona_experiment`)."""
    icl: dict[str, Any] = dataclasses.field(default_factory=lambda: _route_defaults()["icl"])
    persona: dict[str, Any] = dataclasses.field(default_factory=lambda: _route_defaults()["persona"])


@dataclass(config=_STRICT)
class SAEStageConfig:
    # "auto": decompose the direction on an SAE when one is given (path | release + sae_id) or trained for this
    # model under checkpoints/saes (`persona-probe sae train`); true: require one; false: skip
    enabled: Union[bool, Literal["auto"]] = "auto"
    path: Optional[str] = None
    release: Optional[str] = None
    sae_id: Optional[str] = None
    n_questions: Optional[int] = 20
    top: int = 20


@dataclass(config=_STRICT)
class PipelineConfig:
    name: str = "smollm2-malicious"  # output folder name under checkpoints/runs/
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    seed: int = 0
    backend: str = "hf"
    engine: Literal["hf", "vllm"] = "hf"  # sampling engine of every stage that generates (README 'Engines')
    direction: DirectionConfig = dataclasses.field(default_factory=DirectionConfig)
    steering: SteeringConfig = dataclasses.field(default_factory=SteeringConfig)
    judge: str = "offline"
    routes: RoutesConfig = dataclasses.field(default_factory=RoutesConfig)
    route_settings: RouteSettings = dataclasses.field(default_factory=RouteSettings)
    sae: SAEStageConfig = dataclasses.field(default_factory=SAEStageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, Any] = {"model": ModelConfig, "direction": DirectionConfig, "steering": SteeringConfig,
                             "routes": RoutesConfig, "route_settings": RouteSettings, "sae": SAEStageConfig}


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_line(e: ValidationError) -> str:
    errs = e.errors()
    err = errs[0]
    loc = [str(x) for x in err["loc"]]
    section = _SECTIONS.get(loc[0]) if len(loc) > 1 else None
    key = ".".join(loc[:2] if section else loc[:1])
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(sorted(f.name for f in dataclasses.fields(section or PipelineConfig)))
        return f"unknown config key {key!r}: known keys" + (f" of {loc[0]!r}" if section else "") + f" are {known}"
    more = f" (+{len(errs) - 1} more)" if len({e_['loc'][:2] for e_ in errs}) > 1 else ""
    return f"config key {key!r}: {err['msg']} (got {err.get('input')!r}){more}"


def from_dict(d: dict[str, Any]) -> PipelineConfig:
    """Build a validated config from a (partial) mapping; defaults fill what is missing."""
    if not isinstance(d, dict):
        raise PersonaProbeError("expected a mapping of settings")
    merged = _merge(PipelineConfig().to_dict(), d)
    try:
        return PipelineConfig(**{k: v for k, v in merged.items()})
    except ValidationError as e:
        raise PersonaProbeError(_one_line(e)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The default config, updated by a YAML file (`builtin:NAME` for a packaged one) and then `overrides`."""
    d: dict[str, Any] = {}
    if path:
        p = Path(path)
        if str(path).startswith("builtin:"):
            p = Path(str(resources.files("persona_probe") / "configs" / f"{str(path)[8:]}.yaml"))
        if not p.exists():
            raise PersonaProbeError(f"config file {p} does not exist")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PersonaProbeError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(user, dict):
            raise PersonaProbeError(f"{p}: expected a mapping of settings")
        d = user
    if overrides:
        d = _merge(d, overrides)
    return from_dict(d)
