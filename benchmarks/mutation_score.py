"""Mutation score of the safety modules: how many of mutmut's mutants the tests kill.

    uv run --extra test python benchmarks/mutation_score.py [MODULE ...] [--max-children N]

MODULE is one of the keys of MODULES or install.sh (default: all). Each module runs on its own
copy of the repo (git ls-files, in a temp dir that is removed afterwards) with
a [tool.mutmut] section naming that module and only the test files that cover
it, so a run takes minutes rather than hours on 2 cores. Prints, per module,
killed / total and the other verdicts; a mutant "no tests" is one no selected
test reaches in-process (code run only in a subprocess counts as not killed).
install.sh is shell, which mutmut cannot mutate: benchmarks/shell_mutants.py
makes its mutants and runs tests/test_install_sh.py on each.

Not part of .ci/run: on 2 cores each module takes a few minutes, except install.sh
(about 10) and download (about 30: each mutant of get() runs most of its tests).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import shell_mutants  # noqa: E402

SHELL = "install.sh"   # not mutmut's: benchmarks/shell_mutants.py


def _functions(path: str, leave_out: tuple[str, ...] = ()) -> list[str]:
    """mutmut's name globs for every function and method of a module but `leave_out`."""
    import ast

    module = path.removesuffix(".py").replace("/", ".")
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return ([f"{module}.x_{n.name}__mutmut_*" for n in tree.body
             if isinstance(n, ast.FunctionDef) and n.name not in leave_out] + [f"{module}.x\u01c1*"])


# module -> (files to mutate, test files that cover them, mutant-name globs or None = all)
MODULES: dict[str, tuple[list[str], list[str], list[str] | None]] = {
    "unpack": (["installer/unpack.py"], ["tests/test_unpack.py"], None),
    # download: all but session(), whose retry and backoff numbers only change timing
    # (mutating them turns tests into minutes-long waits, not failures)
    "download": (["installer/download.py"], ["tests/test_download.py", "tests/test_download_http.py"],
                 _functions("installer/download.py", leave_out=("session",))),
    "codeobjects": (["installer/codeobjects.py"], ["tests/test_codeobjects.py"], None),
    "patches": (["installer/patches.py"], ["tests/test_patches.py"], None),
    # pyenv: only the index and guard code (the rest drives uv and is covered end to end)
    "pyenv": (["installer/pyenv.py", "installer/torchindex.py"],
              ["tests/test_torchindex.py", "tests/test_torchpins.py", "tests/test_pyenv.py"],
              [f"installer.pyenv.x_{f}__mutmut_*" for f in (
                  "uv_env", "check_index_url", "expect_installed", "_guarded", "installed_versions",
                  "write_constraints", "check_unchanged", "guarded_install")]
              + ["installer.torchindex.*"]),
    "lock": (["installer/lock.py"], ["tests/test_lockfile.py"], None),
    # state: less the SIGINT case, whose installer child inherits the SIGINT mutmut's
    # workers ignore (mutmut/workers/isolation.py) and so never stops
    "state": (["installer/state.py"], ["tests/test_state.py", "tests/test_interrupt.py", "tests/test_engine.py",
                                       "--deselect=tests/test_engine.py::test_signal_kills_the_running_child_"
                                       "and_marks_nothing_done[2]"], None),
}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def run_module(name: str, max_children: int, keep: Path | None = None) -> dict:
    if name == SHELL:
        with _workdir(name, keep) as tmp:
            return shell_mutants.run(REPO, Path(tmp), max_children, _copy_repo)
    mutate, tests, names = MODULES[name]
    mutmut = Path(sys.executable).parent / "mutmut"
    with _workdir(name, keep) as tmp:
        root = Path(tmp)
        _copy_repo(root)
        with open(root / "pyproject.toml", "a", encoding="utf-8") as fh:
            fh.write("\n[tool.mutmut]\n"
                     'source_paths = ["installer"]\n'
                     # package data beside installer/ (recipes.default_recipes_dir looks there)
                     'also_copy = ["recipes", "patches"]\n'
                     f"only_mutate = {_toml_list(mutate)}\n"
                     f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow"]\n'
                     "use_git_change_detection = false\n")
        # pytest's and the tools' temp dirs go into the copy and are removed with it
        (root / "tmp").mkdir()
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(root / "tmp")}
        started = time.monotonic()
        run = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *(names or [])],
                             cwd=root, env=env, capture_output=True, text=True)
        codes = {}
        for meta in (root / "mutants").rglob("*.py.meta"):
            codes.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
        codes = {k: v for k, v in codes.items()
                 if v is not None and (not names or any(fnmatch.fnmatch(k, n) for n in names))}
        if not codes:
            raise SystemExit(f"{name}: mutmut produced no results:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    stats = {v: 0 for v in VERDICTS}
    for code in codes.values():
        stats[verdict(code)] += 1
    stats["total"] = len(codes)
    stats["seconds"] = round(time.monotonic() - started)
    stats["survivors"] = sorted(k for k, v in codes.items() if verdict(v) == "survived")
    return stats


@contextlib.contextmanager
def _workdir(name: str, keep: Path | None):
    """A temp dir removed afterwards, or with --keep, DIR/MODULE emptied and left
    there (for `mutmut show NAME` / `mutmut browse` in it)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=f"mutmut-{name}-") as tmp:
            yield tmp
        return
    keep.mkdir(parents=True, exist_ok=True)
    # tests/conftest.py fails a test run whose checkout changed while it ran: inside
    # this checkout every edit made meanwhile would kill the mutants then under test
    if subprocess.run(["git", "-C", str(keep), "rev-parse", "--git-dir"], capture_output=True).returncode == 0:
        raise SystemExit(f"--keep {keep} is inside a git checkout; pick a directory outside it")
    shutil.rmtree(keep / name, ignore_errors=True)
    (keep / name).mkdir(parents=True)
    yield str(keep / name)


VERDICTS = ("killed", "timeout", "survived", "no tests", "other")


def verdict(code: int) -> str:
    """mutmut's exit-code meaning (mutmut/stats.py status_by_exit_code)."""
    if code in (1, 3):
        return "killed"
    if code == 0:
        return "survived"
    if code in (5, 33):
        return "no tests"
    if code in (36, 24, -24, 152, 255):
        return "timeout"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"one of {', '.join([*MODULES, SHELL])} (default: all)")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print every result as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR/MODULE and leave it there (to look at survivors)")
    args = parser.parse_args()
    known = [*MODULES, SHELL]
    unknown = [m for m in args.modules if m not in known]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}; modules: {', '.join(known)}")
    results = {}
    # score = (killed + timed out) / mutants run: a mutant that hangs the tests fails CI too
    print(f"{'module':<12} {'killed':>7} {'timeout':>7} {'total':>6} {'score':>6} {'survived':>8} "
          f"{'no tests':>8} {'other':>6} {'seconds':>7}")
    for name in args.modules or known:
        s = results[name] = run_module(name, args.max_children, args.keep.resolve() if args.keep else None)
        score = 100.0 * (s["killed"] + s["timeout"]) / s["total"]
        print(f"{name:<12} {s['killed']:>7} {s['timeout']:>7} {s['total']:>6} {score:>5.1f}% "
              f"{s['survived']:>8} {s['no tests']:>8} {s['other']:>6} {s['seconds']:>7}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
