"""The command line: parse, call the core, turn InstallerError into one line.

Logic lives in the stage modules; each command here only gathers options,
calls one core function and prints what it returns.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import EXIT_FAILURE, EXIT_USAGE, InstallerError, UsageError
from .ui import UI



def _default_prefix() -> Path:
    return Path.home() / ".local" / "share" / "rdna4-install" / "default"


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdna4-install"


class _Group(click.Group):
    """`rdna4-install --prefix DIR ...` with no command means `install ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if a not in ("-v", "-vv", "-vvv", "-q", "--verbose", "--quiet")), None)
        if first is not None and first.startswith("-") and first not in ("--help", "-h", "--version"):
            lead = [a for a in args[: args.index(first)]]
            args = lead + ["install"] + args[len(lead):]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InstallerError as exc:
            obj = ctx.find_object(Obj)
            if obj and obj.ui.verbosity >= 2:
                raise
            (obj.ui if obj else UI()).error(exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            UI().error("interrupted; nothing was marked done", "rerun the same command to resume")
            ctx.exit(130)


class Obj:
    def __init__(self, verbosity: int):
        self.ui = UI(verbosity)


pass_obj = click.make_pass_decorator(Obj)


# --- shared options ----------------------------------------------------------

def _path(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


prefix_opt = click.option("--prefix", type=click.Path(path_type=Path), envvar="RDNA4_PREFIX",
                          show_envvar=True, default=None,
                          help="Install into DIR [default: ~/.local/share/rdna4-install/default].")
cache_opt = click.option("--cache-dir", type=click.Path(path_type=Path), envvar="RDNA4_CACHE_DIR",
                         show_envvar=True, default=None,
                         help="Downloads, git mirrors and wheels shared by all prefixes "
                              "[default: $XDG_CACHE_HOME/rdna4-install].")
recipes_opt = click.option("--recipes-dir", type=click.Path(path_type=Path, file_okay=False),
                           envvar="RDNA4_RECIPES_DIR", show_envvar=True, default=None,
                           help="Use recipes from DIR (patches from DIR/../patches).")


def selection_options(fn):
    opts = [
        click.option("--gpu-arch", envvar="RDNA4_GPU_ARCH", show_envvar=True, default=None,
                     metavar="ARCH[,ARCH]", help="Build for these arches instead of the detected GPUs "
                     "(gfx1200, gfx1201); needed on a host without the GPU."),
        click.option("--allow-unsupported-arch", is_flag=True,
                     help="Accept a --gpu-arch other than gfx1200/gfx1201 (untested; warns)."),
        click.option("--only", multiple=True, metavar="RECIPE", help="Run only these recipes."),
        click.option("--skip", multiple=True, metavar="RECIPE", help="Do not run these recipes."),
        click.option("--without", multiple=True, metavar="RECIPE",
                     help="Leave out an optional component, e.g. --without flash-attention."),
        click.option("--jobs", "-j", type=click.IntRange(min=1), envvar="RDNA4_JOBS", show_envvar=True,
                     default=None, help="Parallel compile jobs [default: from free memory and cores]."),
        click.option("--set", "sets", multiple=True, metavar="RECIPE.KEY=VALUE",
                     help="Override one pin, e.g. --set vllm.version=0.33.0."),
        click.option("--pins", "pins_file", type=click.Path(path_type=Path, dir_okay=False),
                     envvar="RDNA4_PINS", show_envvar=True, default=None,
                     help="A TOML file of pins overriding recipes/pins.toml."),
        click.option("--flash-attention-backend", type=click.Choice(["ck", "triton"]), default=None,
                     help="ck builds the CK kernels; triton skips that build and uses the Triton kernels."),
        click.option("--editable", is_flag=True, help="Install vLLM editable from its work tree."),
        click.option("--offline", is_flag=True, envvar="RDNA4_OFFLINE", show_envvar=True,
                     help="Use only the download cache; fail on a miss."),
        recipes_opt, cache_opt, prefix_opt,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _target_archs(opts: dict[str, Any], ui: UI, prefix: Path, receipt: dict[str, Any], *, need: bool,
                  detection: Any = None) -> tuple[str, ...]:
    """--gpu-arch, else the detected RDNA4 arches, else (for reruns) what the prefix was built for."""
    from . import detect

    gpu_arch = opts.get("gpu_arch")
    receipt_archs = tuple(receipt.get("archs") or ())
    if not gpu_arch and not need and receipt_archs:
        return receipt_archs
    if detection is None:
        # with --gpu-arch nothing needs the hardware, so don't wait for rocminfo
        detection = detect.Detection([], (), "") if gpu_arch else detect.detect(prefix=prefix)
    seen = len(detection.warnings)
    try:
        archs = detect.choose_target(detection, gpu_arch, opts.get("allow_unsupported_arch", False))
    except UsageError:
        if gpu_arch or not receipt_archs:
            raise
        archs = receipt_archs  # a build host: keep building for what this prefix targets
    for warning in detection.warnings[seen:]:
        ui.warn(warning)
    return archs


def _settings(opts: dict[str, Any], ui: UI, *, targets: tuple[str, ...] = (), force: bool = False,
              need_gpu: bool = True, detection: Any = None):
    from . import recipes as rcp
    from . import state
    from .plan import Settings

    prefix = _path(opts.get("prefix") or _default_prefix())
    # what the last install here recorded: the target and GPU visibility of a rerun
    receipt = state.read_receipt(prefix) or {}
    cache = _path(opts.get("cache_dir") or _default_cache())
    recipes_dir = _path(opts["recipes_dir"]) if opts.get("recipes_dir") else rcp.default_recipes_dir()
    sets = tuple(opts.get("sets") or ())
    if opts.get("flash_attention_backend"):
        sets += (f"flash-attention.backend={opts['flash_attention_backend']}",)
    without = tuple(opts.get("without") or ())
    if "flash-attention" in without:
        # a pin, not a skip: the activation script must also stop selecting a backend
        sets += ("flash-attention.backend=none",)
        without = tuple(w for w in without if w != "flash-attention")
    pins = rcp.apply_overrides(rcp.load_pins(recipes_dir / rcp.PINS_FILE),
                               pins_file=opts.get("pins_file"), sets=sets)
    archs = _target_archs(opts, ui, prefix, receipt, need=need_gpu, detection=detection)
    return Settings(
        prefix=prefix, cache_dir=cache, recipes_dir=recipes_dir, archs=archs, pins=pins,
        jobs=opts.get("jobs"), only=tuple(opts.get("only") or ()),
        skip=tuple(opts.get("skip") or ()) + without,
        targets=targets, force=force, offline=bool(opts.get("offline")),
        options={"editable": bool(opts.get("editable")),
                 "visible_devices": detection.visible_devices if detection is not None
                 else str(receipt.get("visible_devices", ""))},
    )


def _preflight(settings, detection: Any, ui: UI, archs_given: bool, todo: list) -> None:
    """Doctor's blocking checks, for the recipes about to run (engine.install calls it)."""
    from . import buildenv, doctor

    need = int(sum(i.recipe.disk_gb for i in todo) * 1024 ** 3)
    jobs = buildenv.max_jobs("vllm", override=settings.jobs)
    checks = doctor.run_checks(prefix=settings.prefix, cache_dir=settings.cache_dir, need_bytes=need,
                               jobs=jobs, archs_given=archs_given, blocking_only=True,
                               detection=detection)
    for check in checks:
        if check.status == "warn":
            ui.warn(f"{check.name}: {check.detail}")
    failures = doctor.blocking_failures(checks)
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more; see `rdna4-install doctor`)" if len(failures) > 1 else ""
        raise InstallerError(f"{first.name}: {first.detail}{more}",
                             hint=first.fix or "run `rdna4-install doctor` for details")


def _short(version: str) -> str:
    """A commit SHA as version reads better in a table as its first 12 digits."""
    return version[:12] if len(version) == 40 and all(c in "0123456789abcdef" for c in version) else version


def _print_plan(plan, ui: UI, verbose: bool) -> None:
    width = max((len(i.name) for i in plan.items), default=0)
    click.echo(f"plan for {plan.settings.prefix} (target: {','.join(plan.settings.archs)})")
    for item in plan.items:
        mark = "will run" if item.action == "run" else "skip    "
        version = _short(item.vars.get("_version", ""))
        click.echo(f"  {mark}  {item.name:<{width}}  {version:<20}  {item.reason}")
        if verbose:
            for key, value in item.inputs.get("pins", {}).items():
                click.echo(f"      pin {key} = {value if value != '' else '(empty)'}")
            for key, value in item.inputs.get("source", {}).items():
                click.echo(f"      source {key} = {value}")
            for key, value in item.inputs.get("patches", {}).items():
                click.echo(f"      patch {key} sha256:{value[:16]}")
            if item.fingerprint:
                click.echo(f"      fingerprint {item.fingerprint[:16]}")


# --- commands ------------------------------------------------------------------

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rdna4-install")
@click.option("-v", "--verbose", count=True, help="More output; -vv shows tracebacks.")
@click.option("-q", "--quiet", count=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Build and install vLLM for AMD RDNA4 GPUs (gfx1200/gfx1201) without Docker or root.

    `rdna4-install --prefix DIR [options]` is short for `rdna4-install install --prefix DIR [options]`.
    """
    ctx.obj = Obj(verbose - quiet)


@cli.command()
@selection_options
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--no-checks", is_flag=True, envvar="RDNA4_NO_CHECKS", show_envvar=True,
              help="Skip doctor's blocking host checks (disk, tools, GPU access) before installing.")
@pass_obj
def install(obj: Obj, dry_run: bool, no_checks: bool, **opts: Any) -> None:
    """Install (or update) the whole stack into a prefix."""
    from . import detect, engine

    prefix = _path(opts.get("prefix") or _default_prefix())
    detection = detect.detect(prefix=prefix)
    for warning in detection.warnings:
        obj.ui.warn(warning)
    settings = _settings(opts, obj.ui, detection=detection)
    preflight = None if no_checks else functools.partial(
        _preflight, settings, detection, obj.ui, bool(opts.get("gpu_arch")))
    plan, ran = engine.install(settings, obj.ui, dry_run=dry_run, preflight=preflight)
    if dry_run:
        _print_plan(plan, obj.ui, obj.ui.verbosity >= 1)
        return
    if not ran:
        obj.ui.success(f"everything in {settings.prefix} is up to date")
    else:
        obj.ui.success(f"installed into {settings.prefix}; activate with: . '{settings.prefix}/activate'")


@cli.command()
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("-v", "--verbose", count=True, help="Also show every resolved source, pin and patch.")
@pass_obj
def plan(obj: Obj, as_json: bool, verbose: int, **opts: Any) -> None:
    """Show the ordered steps, which will run and why."""
    from .plan import make_plan

    result = make_plan(_settings(opts, obj.ui, need_gpu=False))
    if as_json:
        click.echo(json.dumps(result.to_json(verbose=True), indent=2))
    else:
        _print_plan(result, obj.ui, obj.ui.verbosity + verbose >= 1)


@cli.command(epilog="Examples:\n\n  rdna4-install run vllm --prefix ~/rdna4\n\n"
                     "  rdna4-install run therock --force --prefix ~/rdna4\n\n"
                     "  rdna4-install run therock --set therock.sha256=<new sha256> --prefix ~/rdna4")
@click.argument("recipes", nargs=-1, required=True)
@click.option("--force", is_flag=True,
              help="Redo the named recipes even when nothing changed; also accept a download whose "
                   "sha256 differs from the one this prefix recorded, and replace what the installer "
                   "did not make (a file in PREFIX/rocm-<version>, a PREFIX/rocm link elsewhere).")
@selection_options
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@pass_obj
def run(obj: Obj, recipes: tuple[str, ...], force: bool, dry_run: bool, **opts: Any) -> None:
    """Rerun RECIPES, then whatever depends on them if its inputs changed."""
    from . import engine

    settings = _settings(opts, obj.ui, targets=recipes, force=force, need_gpu=False)
    result, ran = engine.install(settings, obj.ui, dry_run=dry_run)
    if dry_run:
        _print_plan(result, obj.ui, obj.ui.verbosity >= 1)
    elif not ran:
        obj.ui.success(f"{', '.join(recipes)}: up to date (use --force to redo)")


@cli.command("detect")
@prefix_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def detect_cmd(obj: Obj, prefix: Path | None, as_json: bool) -> None:
    """List AMD GPUs, where each was found, and the build target."""
    from . import detect

    found = detect.detect(prefix=_path(prefix or _default_prefix()))
    if as_json:
        click.echo(json.dumps(found.to_json(), indent=2))
        return
    click.echo(detect.format_table(found))
    for warning in found.warnings:
        obj.ui.warn(warning)


@cli.command()
@prefix_opt
@cache_opt
@recipes_opt
@click.option("--gpu-arch", envvar="RDNA4_GPU_ARCH", show_envvar=True, default=None, metavar="ARCH[,ARCH]",
              help="Building for a GPU elsewhere: GPU checks warn instead of failing.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), envvar="RDNA4_JOBS", show_envvar=True, default=None,
              help="Parallel compile jobs to check memory for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def doctor(obj: Obj, prefix: Path | None, cache_dir: Path | None, recipes_dir: Path | None,
           gpu_arch: str | None, jobs: int | None, as_json: bool) -> None:
    """Check the host: driver, device access, groups, disk, memory, tools."""
    from . import buildenv, state
    from . import doctor as doc
    from . import recipes as rcp

    prefix = _path(prefix or _default_prefix())
    cache = _path(cache_dir or _default_cache())
    folder = _path(recipes_dir) if recipes_dir else rcp.default_recipes_dir()
    # what a full install still needs: every recipe not yet done in this prefix
    need = sum(r.disk_gb for n, r in rcp.load_recipes(folder).items()
               if (state.read_stamp(prefix, n) or {}).get("status") != state.DONE)
    checks = doc.run_checks(prefix=prefix, cache_dir=cache, need_bytes=int(need * 1024 ** 3),
                            jobs=buildenv.max_jobs("vllm", override=jobs), archs_given=bool(gpu_arch))
    if as_json:
        click.echo(json.dumps({"checks": [c.to_json() for c in checks]}, indent=2))
    else:
        click.echo(doc.format_checks(checks))
    if doc.failed(checks):
        raise click.exceptions.Exit(1)


@cli.command()
@prefix_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds the probes may take in all.")
@pass_obj
def verify(obj: Obj, prefix: Path | None, as_json: bool, timeout: float) -> None:
    """Prove the install on the card: torch on HIP, native FP8, CK flash-attention, code objects."""
    from . import verify as ver

    probes = ver.run(_path(prefix or _default_prefix()), timeout=timeout)
    click.echo(ver.to_json(probes) if as_json else ver.format_table(probes))
    if ver.failed(probes):
        raise click.exceptions.Exit(1)


@cli.command()
@prefix_opt
@click.option("--model", default=None, help="Model to serve [default: the reference FP8 Llama-3.1-8B].")
@click.option("--request-rate", type=float, default=None, help="Requests per second [default: 10].")
@click.option("--num-prompts", type=int, default=None, help="Prompts to send [default: 1000].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Server port [default: a free one].")
@click.option("--ready-timeout", type=float, default=None, help="Seconds to wait for the server [default: 1800].")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG", help="Extra `vllm serve` argument.")
@click.option("--bench-arg", "bench_args", multiple=True, metavar="ARG",
              help="Extra `vllm bench serve` argument.")
@pass_obj
def bench(obj: Obj, prefix: Path | None, model: str | None, request_rate: float | None,
          num_prompts: int | None, port: int | None, ready_timeout: float | None,
          serve_args: tuple[str, ...], bench_args: tuple[str, ...]) -> None:
    """Serve the reference model and measure throughput against the reference figures."""
    from . import bench as bn

    kwargs: dict[str, Any] = {k: v for k, v in (("model", model), ("request_rate", request_rate),
                                                ("num_prompts", num_prompts), ("port", port),
                                                ("ready_timeout", ready_timeout)) if v is not None}
    result = bn.run(_path(prefix or _default_prefix()), extra_serve_args=list(serve_args),
                    extra_bench_args=list(bench_args), ui=obj.ui, **kwargs)
    click.echo(bn.format_comparison(result))


@cli.command()
@prefix_opt
@recipes_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def status(obj: Obj, prefix: Path | None, recipes_dir: Path | None, as_json: bool) -> None:
    """Show each recipe: done / failed / pending, version, when, fingerprint."""
    from . import engine
    from . import recipes as rcp

    prefix = _path(prefix or _default_prefix())
    folder = _path(recipes_dir) if recipes_dir else rcp.default_recipes_dir()
    from .plan import dependency_order

    names = dependency_order(rcp.load_recipes(folder))
    rows = engine.status(prefix, names)
    if as_json:
        click.echo(json.dumps({"prefix": str(prefix), "recipes": rows}, indent=2))
        return
    click.echo(f"status of {prefix}")
    for row in rows:
        click.echo(f"  {row['recipe']:<18} {row['status']:<22} {_short(row['version']):<20} "
                   f"{row['when']:<21} {row['fingerprint'][:12]}")


def main() -> None:
    # a SIGTERM unwinds like Ctrl-C, so children are killed and nothing is stamped done
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cli(prog_name="rdna4-install")


if __name__ == "__main__":  # pragma: no cover
    main()
