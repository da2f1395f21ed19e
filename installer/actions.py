"""Named builtin actions a recipe step may call, and the context they get.

Recipes stay data: a step either runs an argv list or names one of these
actions. Each entry is "module:function", imported only when a step uses it, so
loading the plan stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import proc
from .errors import RecipeError, command

LAST_COMMAND = "last-command.sh"

RESOLVERS: dict[str, str] = {
    # recipe name -> "module:function"; see docs/design.md "Resolvers"
    "therock": "installer.therock:resolve",
    "torch": "installer.torchpins:resolve",
    "vllm": "installer.pypi:resolve",
}

# the pins each resolver fills in when they are empty: emptying one with --set/--pins asks
# for the derived value, so it is not the mistake an emptied hand-set pin is
DERIVED: dict[str, tuple[str, ...]] = {
    "therock": ("url", "sha256", "family", "index_url"),
    "torch": ("rocm", "torchvision", "torchaudio", "triton"),
    "vllm": ("sdist_url", "sdist_sha256", "tag", "commit"),
}

ACTIONS: dict[str, str] = {
    # filled in by the stage modules' issues; one line per action
    "install-toolchain": "installer.therock:install_step",
    "create-venv": "installer.pyenv:create_venv_step",
    "install-torch-stack": "installer.pyenv:install_torch_step",
    "check-torch-stack": "installer.pyenv:check_torch_step",
    "write-activation": "installer.activate:write_step",
    "fetch-git": "installer.sources:fetch_git",
    "fetch-sdist": "installer.sources:fetch_sdist",
    "apply-patches": "installer.patches:apply_patches",
    "build-wheel": "installer.builds:build_wheel",
    "install-wheel": "installer.builds:install_wheel",
    "check-code-objects": "installer.builds:check_code_objects",
    "pip-install": "installer.builds:pip_install_step",
}


@dataclass
class StepContext:
    name: str                      # recipe name
    prefix: Path
    cache_dir: Path
    work_dir: Path                 # PREFIX/.rdna4/work/<name>; kept on failure
    log: Path                      # PREFIX/.rdna4/logs/<name>.log
    env: dict[str, str]            # the explicit environment for every command
    vars: Mapping[str, str]        # interpolation values (pins, prefix, archs, ...)
    archs: tuple[str, ...]
    jobs: int                      # --jobs, or 0: each build picks from free memory
    offline: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # install options
    ui: Any = None                 # installer.ui.UI
    facts: dict[str, Any] = field(default_factory=dict)     # recorded in stamp + receipt
    source: Any = None             # the recipe's interpolated recipes.Source, or None
    patches: tuple[Path, ...] = ()  # patches/<name>/*.patch in apply order
    keep_work: bool = False        # an action sets it when the work dir must outlive the run
    force: bool = False            # --force names this recipe: accept a changed download,
                                   # replace what the installer did not make
    rerun_verb: tuple[str, ...] = ()   # for rerun hints: this run's command and selection,
    rerun_sets: tuple[str, ...] = ()   # its --set RECIPE.KEY=VALUE
    rerun_pins: str = ""               # and its pins file

    def fetch(self, url: str, *, sha256: str = "", what: str | None = None,
              sink: Any = None, accept: Any = None) -> Any:
        """download.fetch held to the sha256 this prefix recorded for `url` when
        there is no pin (a fresh cache must not make a swapped file acceptable);
        --force accepts whatever the server serves now. A refused file gets a
        hint with the command that recovers."""
        from . import download, state
        from .errors import Refused

        trusted = None if sha256 or self.force else state.recorded_downloads(self.prefix).get(url)
        try:
            return download.fetch(url, cache_dir=self.cache_dir, sha256=sha256 or None,
                                  offline=self.offline, ui=self.ui, what=what, sink=sink,
                                  accept=accept, trusted=trusted, ignore_recorded=self.force)
        except Refused as exc:
            exc.hint = self._refused_hint(exc, sha256)
            raise

    def _refused_hint(self, exc: Any, pinned: str) -> str:
        kept = f"the file was removed from the cache and {self.prefix} is unchanged"
        got = getattr(exc, "got", None)
        if got:
            # pinning the new hash is what accepts it, whichever record it broke
            keys = [k for k, v in self.vars.items() if k.startswith(f"{self.name}.") and "sha256" in k]
            key = next((k for k in keys if pinned and str(self.vars[k]).lower() == pinned.lower()),
                       keys[0] if keys else f"{self.name}.sha256")
            return f"{kept}; if the new file is expected, pin it: {self.again_command(pin=(key, got))}"
        return (f"{kept}; rerun to download it again: {self.again_command()} "
                "(if the server still serves it, pin another version with --set)")

    def rerun_command(self, *flags: str) -> str:
        """`rdna4-install run NAME FLAGS` in this prefix and cache, with this run's pins and targets."""
        return self._command(["run", self.name, *flags])

    def again_command(self, pin: tuple[str, str] | None = None) -> str:
        """The command this run was (install or run, its selection), with its pins and
        targets; `pin` replaces one of the pins."""
        return self._command(list(self.rerun_verb or ("run", self.name)), pin)

    def _command(self, verb: list[str], pin: tuple[str, str] | None = None) -> str:
        sets = [s for s in self.rerun_sets if not pin or s.partition("=")[0].strip() != pin[0]]
        if pin:
            sets.append(f"{pin[0]}={pin[1]}")
        return command(self.prefix, *verb, *[w for s in sets for w in ("--set", s)],
                       *(["--pins", self.rerun_pins] if self.rerun_pins else []),
                       *(["--gpu-arch", ",".join(self.archs)] if self.archs else []),
                       "--cache-dir", str(self.cache_dir))

    @property
    def src_dir(self) -> Path:
        return self.work_dir / "src"

    def run(self, argv: Sequence[str], *, cwd: Path | str | None = None,
            env: Mapping[str, str] | None = None, on_line: Callable[[str], None] | None = None,
            what: str | None = None, timeout: float | None = None) -> None:
        env = env if env is not None else self.env
        cwd = cwd or self.work_dir
        self._record(argv, env, cwd)
        proc.run(argv, env=env, cwd=cwd, log=self.log, on_line=on_line, what=what, timeout=timeout)

    def _record(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | str) -> None:
        """Keep the exact command and environment as a script in the work dir, so a
        failed step can be rerun by hand (`sh last-command.sh`), and put the variables
        that differ from the recipe's env into the log."""
        import shlex

        changed = {k: v for k, v in env.items() if self.env.get(k) != v}
        if changed and self.log.parent.is_dir():
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.writelines(f"# env {k}={v}\n" for k, v in sorted(changed.items()))
        if self.work_dir.is_dir():
            script = self.work_dir / LAST_COMMAND
            lines = ["#!/bin/sh", f"# the last command of {self.name}; rerun it with: sh {shlex.quote(str(script))}",
                     "env -i \\"]
            lines += [f"  {shlex.quote(f'{k}={v}')} \\" for k, v in sorted(env.items())]
            lines += [f"  sh -c 'cd \"$1\" && shift && exec \"$@\"' _ {shlex.quote(str(cwd))} \\",
                      "  " + " ".join(shlex.quote(str(a)) for a in argv), ""]
            script.write_text("\n".join(lines))


def lookup(name: str, where: str = "") -> Callable[..., None]:
    try:
        target = ACTIONS[name]
    except KeyError:
        known = ", ".join(sorted(ACTIONS)) or "none"
        raise RecipeError(f"{where}unknown action {name!r}", hint=f"known actions: {known}") from None
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)
