"""`persona-probe run`: the whole story in one command, every stage cached by manifest.

extract → character direction (+ random control) → steering sweep (judged) → routes (when enabled)
→ report (self-contained HTML + report.json). Each stage's key hashes its own settings plus the keys
of the stages it depends on, so a rerun with one changed setting recomputes only what depends on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from persona_probe.core.artifacts import base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json, checkpoints_dir

DEFAULT_CONFIG: dict[str, Any] = {
    "name": "smollm2-malicious",
    "model": {"model": "smollm2", "adapter": None, "device": "auto", "dtype": "auto"},
    "seed": 0,
    "backend": "hf",
    "direction": {"trait": "malicious", "position": "prompt_last", "layers": "all", "n_questions": None,
                  "n_prompts": 3, "test_frac": 0.25, "batch_size": 16},
    "steering": {"alphas": [0.0, 0.5, 1.0], "layers": None, "unit": "resid", "where": "all",
                 "questions": "builtin:core", "questions_limit": None, "samples": 2, "max_new_tokens": 40, "temperature": 1.0,
                 "include_random": True, "batch_size": 32},
    "judge": "offline",
    "routes": {"persona": False, "icl": False},
    # per-route keyword arguments, e.g. {"icl": {"ks": [0, 4, 16], "draws": 1}}
    "route_settings": {"icl": {"ks": [0, 4, 16], "draws": 1, "n_samples": 1, "variants": ["none", "safety", "context"]},
                       "persona": {"n_samples": 1}},
    # "auto": decompose the direction on an SAE when one is given (path | release + sae_id) or trained for
    # this model under checkpoints/saes (`persona-probe sae train`); true: require one; false: skip
    "sae": {"enabled": "auto", "path": None, "release": None, "sae_id": None, "n_questions": 20, "top": 20},
}


def deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if k not in out and k not in ("routes_extra",):
            raise PersonaProbeError(f"unknown config key {k!r}: known keys are {', '.join(sorted(out))}")
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path:
        p = Path(path)
        if str(path).startswith("builtin:"):
            from importlib import resources

            p = Path(str(resources.files("persona_probe") / "configs" / f"{str(path)[8:]}.yaml"))
        if not p.exists():
            raise PersonaProbeError(f"config file {p} does not exist")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PersonaProbeError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(user, dict):
            raise PersonaProbeError(f"{p}: expected a mapping of settings")
        cfg = deep_update(cfg, user)
    if overrides:
        cfg = deep_update(cfg, overrides)
    return cfg


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """A cached pipeline stage: runs `fn(folder)` unless `folder/stage.json` carries the same key."""

    def __init__(self, root: Path, name: str, key: str, log: Callable[[str], None]) -> None:
        self.folder, self.name, self.key, self.log = root / name, name, key, log

    def cached(self) -> bool:
        f = self.folder / "stage.json"
        return f.exists() and json.loads(f.read_text()).get("key") == self.key

    def run(self, fn: Callable[[Path], Any], force: bool = False) -> bool:
        if self.cached() and not force:
            self.log(f"[{self.name}] cached ({self.key})")
            return False
        t = time.time()
        self.log(f"[{self.name}] running ...")
        self.folder.mkdir(parents=True, exist_ok=True)
        fn(self.folder)
        atomic_write_json(self.folder / "stage.json", {"key": self.key, "seconds": round(time.time() - t, 1)})
        self.log(f"[{self.name}] done in {time.time() - t:.0f}s")
        return True


def run_pipeline(config: dict[str, Any] | None = None, *, out: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns report.json's content. Outputs land in `out`
    (default checkpoints/runs/<name>)."""
    from persona_probe.directions.derive import load_direction
    from persona_probe.experiments.steer import steering_sweep
    from persona_probe.models.loading import load_model
    from persona_probe.prompts.questions import as_questions
    from persona_probe.directions.workflows import persona_direction

    cfg = config or load_config()
    root = Path(out) if out else checkpoints_dir() / "runs" / cfg["name"]
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    m = cfg["model"]
    handle = load_model(m["model"], adapter=m.get("adapter"), device=m.get("device"), dtype=m.get("dtype"))
    model_key = _key(handle.info.fingerprint, handle.info.adapter_fingerprint, handle.info.dtype)
    seed, backend = cfg["seed"], cfg["backend"]
    dcfg, scfg = cfg["direction"], cfg["steering"]
    timings: dict[str, float] = {}

    k_dir = _key(model_key, dcfg, seed, backend)
    st = Stage(root, "direction", k_dir, log)
    t = time.time()
    st.run(lambda f: persona_direction(
        handle, dcfg["trait"], position=dcfg["position"], layers=dcfg["layers"], n_questions=dcfg["n_questions"],
        n_prompts=dcfg["n_prompts"], backend=backend, batch_size=dcfg["batch_size"], out=f, seed=seed,
        test_frac=dcfg["test_frac"]))
    timings["direction"] = time.time() - t
    direction = load_direction(st.folder)

    k_steer = _key(k_dir, scfg, cfg["judge"], seed, backend)
    st_s = Stage(root, "steering", k_steer, log)
    t = time.time()
    qs = as_questions(scfg["questions"], limit=scfg.get("questions_limit"))
    st_s.run(lambda f: steering_sweep(
        handle, direction, layers=scfg["layers"], alphas=scfg["alphas"], questions=qs,
        n_samples=scfg["samples"], unit=scfg["unit"], where=scfg["where"], include_random=scfg["include_random"],
        judge=cfg["judge"], max_new_tokens=scfg["max_new_tokens"], temperature=scfg["temperature"], seed=seed,
        batch_size=scfg["batch_size"], backend=backend, out=f))
    timings["steering"] = time.time() - t

    extras: dict[str, Any] = {}
    for name, enabled in cfg.get("routes", {}).items():
        if enabled:
            extras[name] = _run_route(name, cfg, handle, direction, root, k_dir, log)

    from persona_probe.sae.sae import run_sae_stage

    sae_res = run_sae_stage(cfg, handle, direction, root, k_dir, log)
    if sae_res is not None:
        extras["sae"] = sae_res

    from persona_probe.report.page import write_report

    manifest = base_manifest("run", config=cfg, model=handle.info.to_dict(), stage_keys={
        "direction": k_dir, "steering": k_steer}, seconds=round(time.time() - t0, 1),
        stage_seconds={k: round(v, 1) for k, v in timings.items()})
    report = write_report(root, manifest, direction, extras)
    log(f"report: {root / 'report.html'}")
    return report


def _run_route(name: str, cfg: dict[str, Any], handle: Any, direction: Any, root: Path, k_dir: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Optional route stages (ICL, persona prompts) plug in here as they land."""
    try:
        from persona_probe.experiments import routes
    except ImportError:
        raise PersonaProbeError(f"route {name!r} is not available in this version") from None
    return routes.run_route_stage(name, cfg, handle, direction, root, k_dir, log)
