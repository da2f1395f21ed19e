"""Target profiles: which hardware a prefix is built for, as data (recipes/targets/<name>.toml).

A profile names its gfx archs and whether they are integrated (APU) GPUs, the
pins it sets by default (TheRock tarball family, flash-attention backend), the
patches that apply to it, what `verify` may claim about FP8, which doctor checks
apply and the serving defaults `bench` uses. Adding a target is a new file:
detection, `--target`, `--gpu-arch`, plan, lock and bundle all read these.

One prefix holds one profile; the receipt, the lock and a bundle record it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import RecipeError, UsageError

TARGETS_DIR = "targets"
DEFAULT = "rdna4"
FP8_KINDS = ("native", "weight-only", "none")
# [serving] bench_quantization values; bench.QUANT_SERVE_ARGS gives each its serve flags
BENCH_QUANTIZATIONS = ("fp8", "bf16", "fp16", "awq", "gptq")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    archs: tuple[str, ...]
    integrated: bool
    pins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    leave_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # recipe -> patch files
    fp8: str = "native"
    unified_memory: bool = False
    serving: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None

    def patches_for(self, recipe: str, files: Iterable[Path]) -> tuple[list[Path], list[str]]:
        """(the patches of `recipe` this profile applies, a note per patch left out)."""
        out = self.leave_out.get(recipe, ())
        files = list(files)
        return ([p for p in files if p.name not in out],
                [f"patch {p.name} left out: not for target {self.name}" for p in files if p.name in out])


def _table(where: str, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: [{name}] must be a table")
    return value


def load_file(path: Path) -> Profile:
    from .recipes import _read_toml

    where = str(path)
    data = _read_toml(path)
    unknown = set(data) - {"target", "pins", "patches", "verify", "doctor", "serving"}
    if unknown:
        raise RecipeError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}")
    target = _table(where, data, "target")
    name = target.get("name")
    if name != path.stem:
        raise RecipeError(f"{where}: [target] name must be {path.stem!r} (the file name), not {name!r}")
    archs = target.get("archs")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a.startswith("gfx")
                                                            for a in archs):
        raise RecipeError(f"{where}: [target] archs must be a non-empty list of gfx names")
    pins = _table(where, data, "pins")
    for table, values in pins.items():
        if not isinstance(values, dict) or not all(isinstance(v, (str, int, bool)) for v in values.values()):
            raise RecipeError(f"{where}: [pins.{table}] must hold RECIPE.KEY values (strings, numbers, booleans)")
    leave_out = {}
    for recipe, names in _table(where, _table(where, data, "patches"), "leave_out").items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RecipeError(f"{where}: [patches.leave_out] {recipe} must be a list of patch file names")
        leave_out[recipe] = tuple(names)
    fp8 = _table(where, data, "verify").get("fp8", "native")
    if fp8 not in FP8_KINDS:
        raise RecipeError(f"{where}: [verify] fp8 must be one of {', '.join(FP8_KINDS)}, not {fp8!r}")
    serving = {str(k): str(v) for k, v in _table(where, data, "serving").items()}
    if serving.get("bench_quantization", "fp8") not in BENCH_QUANTIZATIONS:
        raise RecipeError(f"{where}: [serving] bench_quantization must be one of "
                          f"{', '.join(BENCH_QUANTIZATIONS)}, not {serving['bench_quantization']!r}")
    return Profile(name=name, description=str(target.get("description", "")), archs=tuple(archs),
                   integrated=bool(target.get("integrated", False)), pins=pins, leave_out=leave_out,
                   fp8=fp8, unified_memory=bool(_table(where, data, "doctor").get("unified_memory", False)),
                   serving=serving, path=path)


def load_all(recipes_dir: Path | None = None) -> dict[str, Profile]:
    """Every profile in recipes_dir/targets/ (the shipped ones when a recipes dir has no
    targets/), discrete ones first (detection's preference)."""
    from .recipes import default_recipes_dir

    folder = (recipes_dir or default_recipes_dir()) / TARGETS_DIR
    if not folder.is_dir():
        folder = default_recipes_dir() / TARGETS_DIR
    profiles = [load_file(p) for p in sorted(folder.glob("*.toml"))]
    seen: dict[str, Profile] = {}
    for p in profiles:
        for arch in p.archs:
            if arch in seen:
                raise RecipeError(f"{folder}: {arch} is in targets {seen[arch].name} and {p.name} "
                                  f"({seen[arch].path.name}, {p.path.name})",
                                  hint="an arch belongs to one target profile")
            seen[arch] = p
    return {p.name: p for p in sorted(profiles, key=lambda p: (p.integrated, p.name))}


def supported_archs(profiles: Mapping[str, Profile]) -> tuple[str, ...]:
    return tuple(a for p in profiles.values() for a in p.archs)


def names_hint(profiles: Mapping[str, Profile]) -> str:
    return ", ".join(f"{p.name} ({', '.join(p.archs)})" for p in profiles.values())


def get(profiles: Mapping[str, Profile], name: str) -> Profile:
    if name not in profiles:
        raise UsageError(f"unknown target {name!r}",
                         hint=f"targets: {names_hint(profiles)}; e.g. --target {next(iter(profiles), DEFAULT)}")
    return profiles[name]


def of_archs(profiles: Mapping[str, Profile], archs: Iterable[str]) -> Profile | None:
    """The profile that holds every one of `archs`; None when none does."""
    archs = set(archs)
    return next((p for p in profiles.values() if archs and archs <= set(p.archs)), None)


def of_receipt(receipt: Mapping[str, Any], archs: Iterable[str] | None = None,
               profiles: Mapping[str, Profile] | None = None) -> Profile | None:
    """The profile an installed prefix was built for: its receipt's "target", else (older
    receipts) the profile holding its archs; `archs` (a --gpu-arch override) wins."""
    profiles = load_all() if profiles is None else profiles
    named = profiles.get(str(receipt.get("target") or ""))
    archs = tuple(archs or receipt.get("archs") or ())
    if named is not None and set(archs) <= set(named.archs):
        return named
    return of_archs(profiles, archs)


def pin_defaults(profile: Profile | None, pins: Mapping[str, Mapping[str, Any]],
                 origins: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """recipes/pins.toml with the profile's pin defaults laid over it (before --pins/--set).
    Only keys the pins file declares: a recipes dir without that pin has no use for it."""
    out = {t: dict(v) for t, v in pins.items()}
    if profile is None:
        return out
    for table, values in profile.pins.items():
        for key, value in values.items():
            if key not in out.get(table, {}):
                continue
            out[table][key] = value
            if origins is not None:
                origins[f"{table}.{key}"] = f"target {profile.name}"
    return out
