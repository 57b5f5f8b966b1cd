"""``reflexd install-service`` (and ``make install-service``): reflexd as a systemd service on a host.

Lays down, under ``--destdir`` (default /, a staging root for packagers and tests):

- ``PREFIX`` (/opt/reflexd): a venv of its own with reflexd installed from the source tree (not
  editable) and the CPU build of torch, so the console script is ``PREFIX/bin/reflexd``;
- ``/etc/systemd/system/reflexd.service`` and ``reflexd.socket``, pointing at that script;
- ``/etc/sysusers.d/reflexd.conf`` and ``/etc/tmpfiles.d/reflexd.conf`` (the user, group and
  directories);
- ``/etc/reflexd/reflexd.yaml``, the documented default config with ``socket.group: reflexd``,
  unless the file exists (an existing config is never overwritten).

Nothing is started: it prints the systemd commands that create the user and directories and
enable the units. Installing again upgrades reflexd in the same venv and the unit files, and
keeps the config. With ``--destdir`` the venv's scripts are rewritten to name ``PREFIX``, where
the tree is meant to be copied.

This module needs the standard library only (and ``reflexd.errors``, which does too, read from
its file when reflexd is not installed), so ``make install-service`` runs it with the system's
``python3`` (``python3 daemon/tools/install.py``) before anything is installed.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Sequence, TextIO

DEFAULT_PREFIX = "/opt/reflexd"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
UNIT_DIR = "/etc/systemd/system"
SYSUSERS_DIR = "/etc/sysusers.d"
TMPFILES_DIR = "/etc/tmpfiles.d"
CONFIG_DIR = "/etc/reflexd"
SERVICE_GROUP = "reflexd"
UNITS = ("reflexd.service", "reflexd.socket")  # in the source tree's systemd/

try:
    from reflexd.errors import InstallError
except ImportError:  # run as a script before reflexd is installed: errors.py needs only the standard library
    import importlib.util

    _errors_file = Path(__file__).resolve().parents[1] / "errors.py"
    _spec = importlib.util.spec_from_file_location("_reflexd_errors", _errors_file)
    assert _spec is not None and _spec.loader is not None
    _errors = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_errors)
    InstallError = _errors.InstallError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"where the venv goes (default {DEFAULT_PREFIX})")
    parser.add_argument(
        "--destdir", default="", help="stage everything under this root instead of / (the units still name --prefix)"
    )
    parser.add_argument("--source", help="the reflexd source tree (default: the one this command comes from)")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter the venv is made from, 3.11 or later (default: this one)"
    )
    parser.add_argument(
        "--find-links", action="append", default=[], metavar="DIR", help="a directory of wheels for pip (repeatable)"
    )
    parser.add_argument(
        "--torch-index",
        default=CPU_TORCH_INDEX,
        metavar="URL",
        help=f"index the pinned torch is installed from first (default: the CPU-only builds, {CPU_TORCH_INDEX});"
        " '' leaves torch to pip's own index and --find-links",
    )
    parser.add_argument(
        "--pip-arg", action="append", default=[], metavar="ARG",
        help="one more argument for pip install, as --pip-arg=--no-index (repeatable)",
    )
    parser.add_argument("--unit-dir", default=UNIT_DIR, help=f"where the units go (default {UNIT_DIR})")
    parser.add_argument("--sysusers-dir", default=SYSUSERS_DIR, help=f"sysusers snippet folder ({SYSUSERS_DIR})")
    parser.add_argument("--tmpfiles-dir", default=TMPFILES_DIR, help=f"tmpfiles snippet folder ({TMPFILES_DIR})")


def find_source(start: Path | None = None) -> Path | None:
    """The source tree this module sits in (``daemon/tools/install.py``), if it is one."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "systemd" / "reflexd.service").is_file():
            return parent
    return None


def torch_requirement(source: Path) -> str | None:
    """The torch pin of ``pyproject.toml`` (``torch==2.13.0``), or None if it names none."""
    deps = tomllib.loads((source / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if re.match(r"torch\s*[=<>~!]", dep):
            return re.sub(r"\s+", "", dep.split(";")[0])
    return None


def unit_text(text: str, prefix: str) -> str:
    """A shipped unit with its commands pointing at ``prefix``'s console script."""
    default = f"{DEFAULT_PREFIX}/bin/reflexd"
    if default not in text and "ExecStart=" in text:
        raise InstallError(f"the shipped unit no longer runs {default}; cannot point it at {prefix}")
    return text.replace(default, f"{prefix.rstrip('/')}/bin/reflexd")


def service_config(text: str) -> str:
    """The documented default config as the service runs it: ``socket.group: reflexd``, so members of
    the service's group (reflexd.sysusers) may connect."""
    found = re.search(r"^socket:\n(?:(?:  .*|#.*|)\n)*?(  group: null)\n", text, flags=re.MULTILINE)
    if found is None:
        raise InstallError("configs/reflexd.yaml: no 'group: null' line in its socket section to set to reflexd")
    start, end = found.span(1)
    line = f"  group: {SERVICE_GROUP}  # set by install-service: the reflexd group's members may connect"
    return text[:start] + line + text[end:]


def install(args: argparse.Namespace, out: TextIO | None = None) -> Path:
    """Lay everything down as ``args`` say (see ``add_arguments``); the staged venv's path."""
    log = out or sys.stdout
    source = Path(args.source).resolve() if args.source else find_source()
    if source is None or not (source / "systemd" / "reflexd.service").is_file():
        raise InstallError(
            "cannot find the reflexd source tree (pyproject.toml, systemd/, configs/): run this from a checkout,"
            " or name it with --source DIR"
        )
    prefix = args.prefix.rstrip("/") or "/"
    if not prefix.startswith("/"):
        raise InstallError(f"--prefix {args.prefix!r} must be an absolute path")
    root = Path(args.destdir or "/")
    staged = _under(root, prefix)
    old_umask = os.umask(0o022)  # the service user must read everything installed here
    try:
        _lay_down(args, source, prefix, root, staged, log)
    except OSError as exc:
        denied = exc.errno in (errno.EPERM, errno.EACCES)
        hint = " (run it as root, or stage the files with --destdir / DESTDIR=)" if denied else ""
        raise InstallError(f"{exc.filename or 'install'}: {exc.strerror or exc}{hint}") from None
    finally:
        os.umask(old_umask)
    for problem in _unreadable(staged / "bin" / "python"):
        print(f"warning: {problem}", file=log)
    if not args.destdir:
        print(
            "\nnext, as root:\n"
            "  systemd-sysusers && systemd-tmpfiles --create\n"
            "  systemctl daemon-reload\n"
            "  systemctl enable --now reflexd.socket reflexd.service\n"
            f"then `{prefix}/bin/reflexd status` (as root or a member of the reflexd group).",
            file=log,
        )
    return staged


def _lay_down(args: argparse.Namespace, source: Path, prefix: str, root: Path, staged: Path, log: TextIO) -> None:
    _install_venv(args, source, prefix, staged, log)
    for unit in UNITS:
        text = unit_text((source / "systemd" / unit).read_text(), prefix)
        _write(_under(root, args.unit_dir) / unit, text, log)
    for snippet, where in (("reflexd.sysusers", args.sysusers_dir), ("reflexd.tmpfiles", args.tmpfiles_dir)):
        _write(_under(root, where) / "reflexd.conf", (source / "systemd" / snippet).read_text(), log)
    config = _under(root, CONFIG_DIR) / "reflexd.yaml"
    if config.exists():
        print(f"kept {config} (it exists; the shipped default is {source / 'configs' / 'reflexd.yaml'})", file=log)
    else:
        _write(config, service_config((source / "configs" / "reflexd.yaml").read_text()), log)


def _unreadable(python: Path) -> list[str]:
    """Why another user (the service's) could not run the venv's interpreter, if it could not."""
    target = Path(os.path.realpath(python))
    problems = []
    for folder in reversed(target.parents):
        try:
            if not os.stat(folder).st_mode & 0o001:
                problems.append(f"{folder} is not searchable by other users, so the reflexd user cannot run {target}")
                break
        except OSError:
            break
    try:
        if os.stat(target).st_mode & 0o005 != 0o005:
            problems.append(f"{target} is not readable and executable by other users")
    except OSError:
        pass
    if problems:
        problems.append("make the venv from a system interpreter instead (--python /usr/bin/python3)")
    return problems


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _write(path: Path, text: str, log: TextIO) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"installed {path}", file=log)


def _run(cmd: Sequence[str | os.PathLike[str]], what: str, log: TextIO) -> None:
    """Run ``cmd``: its output goes to the terminal when ``log`` is stdout, else into the error."""
    print("+ " + " ".join(str(c) for c in cmd), file=log, flush=True)
    shown = log is sys.stdout
    try:
        done = subprocess.run(
            [str(c) for c in cmd],
            stdout=None if shown else subprocess.PIPE,
            stderr=None if shown else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise InstallError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        detail = "see its output above" if shown else (done.stdout or "").strip()[-3000:]
        raise InstallError(f"{what} failed (exit {done.returncode}): {detail}")


def _install_venv(args: argparse.Namespace, source: Path, prefix: str, staged: Path, log: TextIO) -> None:
    python = staged / "bin" / "python"
    if not python.exists():
        staged.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _run(
            [args.python, "-m", "venv", staged],
            f"creating the venv {staged} (on Debian and Ubuntu `python3 -m venv` needs the python3-venv package)",
            log,
        )
    links = [a for d in args.find_links for a in ("--find-links", d)]
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", *links, *args.pip_arg]
    pin = torch_requirement(source)
    if pin and args.torch_index and not _has(python, pin):
        # the CPU build: the default index's torch for Linux brings CUDA libraries (gigabytes)
        _run([*pip, "--index-url", args.torch_index, pin], f"installing {pin} from {args.torch_index}", log)
    with tempfile.TemporaryDirectory(prefix="reflexd-build-") as tmp:
        tree = _clean_copy(source, Path(tmp) / "reflexd")
        _run([*pip, tree], f"installing reflexd from {source} into {staged}", log)
    if not (staged / "bin" / "reflexd").exists():
        raise InstallError(f"pip ran, but {staged / 'bin' / 'reflexd'} is missing")
    if staged != Path(prefix):
        _relocate(staged, prefix)


def _has(python: Path, pin: str) -> bool:
    """Is ``pin`` (``name==version``) installed in the venv of ``python``?"""
    name, _, version = pin.partition("==")
    if not version:
        return False
    code = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    done = subprocess.run([str(python), "-c", code, name], capture_output=True, text=True, check=False)
    have = done.stdout.strip()
    return done.returncode == 0 and (have == version or have.startswith(version + "+"))


def _clean_copy(source: Path, dest: Path) -> Path:
    """What the build reads (pyproject.toml, the readme, the package folders), copied so that no
    stale ``build/`` of the source tree finds its way into the installed package."""
    meta = tomllib.loads((source / "pyproject.toml").read_text())
    folders = set(meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    readme = meta["project"].get("readme")
    dest.mkdir()
    shutil.copy2(source / "pyproject.toml", dest / "pyproject.toml")
    if isinstance(readme, str):
        shutil.copy2(source / readme, dest / readme)
    for folder in sorted(folders):
        shutil.copytree(source / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _relocate(staged: Path, prefix: str) -> None:
    """Make a venv built at ``staged`` name ``prefix``, where it will run: its scripts' ``#!`` lines,
    the activate scripts and pyvenv.cfg."""
    old, new = str(staged).encode(), prefix.encode()
    for path in [*sorted((staged / "bin").iterdir()), staged / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            os.chmod(path, mode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="install.py",
        description="Install reflexd as a systemd service (see `reflexd install-service --help`).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        install(args)
    except InstallError as exc:
        print(f"install-service: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
