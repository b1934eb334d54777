"""One run folder, one run: a lock, a fingerprint of what made its results, no stale temporaries.

A run folder (``runs/<name>/``, a comparison cell) holds results that are resumed and reused, so it
must say what produced them::

    fingerprint.json   sha256 of the resolved config (as canonical JSON, minus the keys that cannot
                       change a result: progress bars, log and checkpoint intervals, the output
                       folder) and of the aptp / plugin versions, with the config it hashes, and
                       the code revision that wrote it (aptp's version, git commit, uncommitted
                       changes: information, not hashed; see :func:`code_revision`)
    .aptp.lock         held (``filelock``) by the one process running in the folder
    .aptp.lock.json    who holds it: pid, host, start time

:func:`open_run` wraps a run: lock, refuse a folder whose results came from another config
(before anything in it is written), remove temporaries a killed run left, record the fingerprint
and ``config.yaml``. ``restart=True`` discards the folder's results first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aptp.core.errors import ConfigError, OutputError, RunLockedError
from aptp.core.registry import Registry

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".aptp.lock"
OWNER_FILE = ".aptp.lock.json"
FORMAT = 1
#: keys (at any depth of a component section) that change how a run reports or saves, not what it computes
NON_RESULT_KEYS = frozenset({"progress", "log_every", "checkpoint_every", "resume", "cache_size"})
#: top-level keys that only name or place the run
NON_RESULT_TOP_KEYS = frozenset({"name", "output_dir"})
#: how to proceed, appended to a refusal
RUN_HINT = ("Rerun with --restart to discard those results and start over, or write to another folder "
            "(--output-dir).")


# ------------------------------------------------------------------------------------------ fingerprint
def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _strip(v) for k, v in node.items() if k not in NON_RESULT_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def canonical_config(config: DictConfig | dict) -> dict[str, Any]:
    """The resolved config as plain data, without the keys that cannot change a result."""
    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    return {k: _strip(v) for k, v in plain.items() if k not in NON_RESULT_TOP_KEYS}


def _or_installed(registry: Registry | None) -> Registry:
    """``registry``, or the installed plugins' where a top-level caller (open_run, fingerprint,
    check_run_folder) was given none; the helpers below take the registry they are passed."""
    if registry is not None:
        return registry
    from aptp.core.plugins import default_registry

    return default_registry()


def component_versions(config: DictConfig | dict, registry: Registry) -> dict[str, str]:
    """``{distribution: version}`` of aptp and of every plugin distribution providing a component
    the config names (an unrelated plugin installed later does not change a run's fingerprint)."""
    from aptp import __version__
    from aptp.core.config import SLOTS

    versions = {"aptp": __version__}
    for slot, (kind, _) in SLOTS.items():
        node = config.get(slot) if config is not None else None
        if node is None:
            continue
        sections = list(node) if isinstance(node, (list, tuple)) or OmegaConf.is_list(node) else [node]
        for section in sections:
            name = str(section["name"])
            if name not in registry[kind]:
                continue  # validation reports it
            dist = registry[kind].get(name).distribution
            if dist:
                dist_name, _, version = str(dist).rpartition(" ")
                versions[dist_name or version] = version if dist_name else ""
    return dict(sorted(versions.items()))


def _git(package_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=None)
def _git_revision(package_dir: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout ``package_dir`` is tracked in, else (None, None)."""
    # tracked, not merely under a checkout: aptp installed in a .venv inside some repository
    # is not that repository's code
    if _git(package_dir, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git(package_dir, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def code_revision() -> dict[str, Any]:
    """The code that is running: ``{"aptp": version, "commit": sha or None, "dirty": bool or None}``
    (``commit`` / ``dirty`` when aptp is imported from a git checkout; dirty = uncommitted changes
    to tracked files).

    Recorded in ``fingerprint.json`` and shown when a folder is refused, so that one can tell which
    code produced a folder's results, but **not hashed**: the commit changes with every edit (a bug
    fix elsewhere, a docs change, ``git pull``), so matching it would refuse every resume and every
    rerun of a finished run during development although the config, which decides the results, is
    the same. Releases are matched through the versions (:func:`component_versions`)."""
    from aptp import __version__

    commit, dirty = _git_revision(Path(__file__).resolve().parents[1])
    return {"aptp": __version__, "commit": commit, "dirty": dirty}


def _describe_code(code: Any) -> str:
    if not isinstance(code, dict):
        return "an aptp that recorded no code revision"
    text = f"aptp {code.get('aptp', '?')}"
    if code.get("commit"):
        text += f" at commit {str(code['commit'])[:12]}{' with uncommitted changes' if code.get('dirty') else ''}"
    return text


def fingerprint(config: DictConfig | dict, registry=None) -> dict[str, Any]:
    """What :data:`FINGERPRINT_FILE` holds: ``sha256`` over the canonical config and the versions,
    and the code revision (:func:`code_revision`; information only, outside the hash)."""
    body = {"config": canonical_config(config), "versions": component_versions(config, _or_installed(registry))}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"format": FORMAT, "sha256": digest, **body, "code": code_revision()}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(node, list) and node and any(isinstance(v, (dict, list)) for v in node):
        out = {f"{prefix}.length": len(node)}
        for i, v in enumerate(node):
            out.update(_leaves(v, f"{prefix}.{i}"))
        return out
    return {prefix: node}


_ABSENT = "(absent)"


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every dotted key whose value differs between two fingerprints."""
    out = []
    for part, label in (("config", ""), ("versions", "version of ")):
        a, b = _leaves(old.get(part) or {}), _leaves(new.get(part) or {})
        for key in sorted(set(a) | set(b), key=lambda k: (k not in b, k)):
            if a.get(key, _ABSENT) != b.get(key, _ABSENT):
                out.append(f"{label}{key}: {json.dumps(a.get(key, _ABSENT))} → {json.dumps(b.get(key, _ABSENT))}")
    return out


# ------------------------------------------------------------------------------------------ the folder
def has_results(directory: str | Path, besides: tuple[str, ...] = ()) -> bool:
    """Whether ``directory`` holds anything besides this module's lock files (and ``besides``)."""
    directory = Path(directory)
    return directory.is_dir() and any(p.name not in (LOCK_FILE, OWNER_FILE, *besides) for p in directory.iterdir())


def check_run_folder(directory: str | Path, config: DictConfig, registry=None, hint: str = RUN_HINT) -> str:
    """``"new"`` (no results), ``"same"`` (results of this fingerprint) or ``"adopt"`` (results of an
    older aptp that wrote no fingerprint, whose ``config.yaml``, when readable, agrees); a ConfigError
    naming what differs when the folder's results come from another config. Writes nothing."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"output folder {directory} is a file; choose another --output-dir.")
    registry = _or_installed(registry)
    new = fingerprint(config, registry)
    path = directory / FINGERPRINT_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            digest = old["sha256"]
        except (ValueError, KeyError, TypeError, OSError):
            raise ConfigError(f"{path} is damaged, so the results in {directory} cannot be matched to a "
                              f"config. {hint}") from None
        if digest == new["sha256"] or _same_with_new_defaults(old, new, registry):
            return "same"
        if not has_results(directory, besides=(FINGERPRINT_FILE, "config.yaml")):
            return "new"  # a run that stopped before writing anything (e.g. a config error): nothing to lose
        _refuse(directory, differences(old, new), hint, (old.get("code"), new["code"]))
    if not has_results(directory):
        return "new"
    saved = directory / "config.yaml"
    if saved.is_file():
        old_config = _readable_config(saved, registry)
        if old_config is not None:
            diff = differences({"config": canonical_config(old_config)}, {"config": new["config"]})
            if diff:
                _refuse(directory, diff, hint, (None, new["code"]))
    return "adopt"


def _same_with_new_defaults(old: dict[str, Any], new: dict[str, Any], registry) -> bool:
    """Whether ``old``'s config, with the options added to aptp since then filled in at their
    defaults, is ``new``'s config (and the versions agree): an option added with a default that
    keeps the old behaviour must not orphan every finished run. (Whether the code behaves as it
    did is the code revision's question, which fingerprints record but do not match: see
    :func:`code_revision`.)"""
    if old.get("versions") != new.get("versions") or not isinstance(old.get("config"), dict):
        return False
    filled = _readable_config(OmegaConf.create(old["config"]), registry, "fingerprint.json")
    return filled is not None and canonical_config(filled) == new["config"]


def _readable_config(source: Path | DictConfig, registry, where: str | None = None) -> DictConfig | None:
    """The validated config of an older run (its ``config.yaml``, or a config node) with the
    defaults of today filled in, or None."""
    from aptp.core.config import validate

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = OmegaConf.load(source) if isinstance(source, Path) else source
            return validate(raw, registry, where or str(source))
    except Exception:  # an older or foreign format: adopt with a warning rather than guess
        return None


def _refuse(directory: Path, diff: list[str], hint: str, code: tuple[Any, Any] = (None, None)) -> None:
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    made_by = f" They were made by {_describe_code(code[0])}; this is {_describe_code(code[1])}." \
        if code[1] is not None else ""
    raise ConfigError(f"{directory} holds results of a different run ({shown or 'fingerprint differs'}); "
                      f"nothing was changed.{made_by} {hint}")


def start_over(directory: str | Path) -> None:
    """Delete everything in ``directory`` but its lock files (call with the lock held)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name in (LOCK_FILE, OWNER_FILE):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary folders a killed run left (half-written checkpoints and experts);
    call with the lock held, so that no other process is writing them. Returns what was removed."""
    from aptp.core.checkpoint import remove_stale_temps as remove_checkpoint_temps

    directory = Path(directory)
    removed: list[Path] = []
    checkpoints = directory / "checkpoints"
    if checkpoints.is_dir():
        for sub in checkpoints.iterdir():
            if sub.is_dir():
                removed += remove_checkpoint_temps(sub)
    experts = directory / "experts"
    if experts.is_dir():
        for p in experts.glob(".expert-*.tmp*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------ the lock
_HELD: dict[str, list] = {}  # lock path -> [FileLock, depth]: a process may nest open_run calls


def _owner(directory: Path) -> str:
    try:
        info = json.loads((directory / OWNER_FILE).read_text())
        return f" by pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@contextmanager
def lock_run_folder(directory: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if needed) for the ``with`` block; a
    RunLockedError at once when another process holds it. Re-entrant within one process."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{directory} is in use: its lock {path} is held{_owner(directory)}. Wait for that run to "
            "finish (or stop it), or write to another folder (--output-dir)."
        ) from None
    _HELD[key] = [lock, 1]
    try:
        (directory / OWNER_FILE).write_text(json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        yield path
    finally:
        del _HELD[key]
        try:
            (directory / OWNER_FILE).unlink()
        except OSError:
            pass
        lock.release()


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` / ``accelerate launch`` job (or a single process): the one that
    locks and writes the run folder; the other ranks only check it."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and check a file can be written in it; an OutputError (one
    line, what to do) when it is under a file, read-only, or the disk is full."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".aptp-write-test-{os.getpid()}"
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"cannot write to the output folder {directory} ({exc.strerror or exc}); choose another "
            "--output-dir, or make it writable."
        ) from exc


@contextmanager
def open_run(directory: str | Path, config: DictConfig, registry=None, restart: bool = False,
             hint: str = RUN_HINT) -> Iterator[str]:
    """Run in ``directory``: take its lock, [discard its results when ``restart``], refuse it when
    its results come from another config (nothing written before), adopt an older run's results
    with a warning, remove a killed run's temporaries, then write ``fingerprint.json`` and
    ``config.yaml``. Yields the folder's status (``new``, ``same``, ``adopt``)."""
    directory, registry = Path(directory), _or_installed(registry)
    if not is_main_process():  # rank 0 owns the folder; the others refuse what it refuses
        yield "same" if restart else check_run_folder(directory, config, registry, hint)
        return
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"output folder {directory} is a file; choose another --output-dir.")
    if not restart:  # refuse before even taking the lock: a refused folder is left exactly as it was
        check_run_folder(directory, config, registry, hint)
    check_writable(directory)
    with lock_run_folder(directory):
        if restart:
            start_over(directory)
        status = check_run_folder(directory, config, registry, hint)
        if status == "adopt":
            warnings.warn(f"{directory} holds results of an earlier aptp that recorded no fingerprint; "
                          "adopting them for this config (rerun with --restart to start over).", stacklevel=3)
        for p in remove_stale_temps(directory):
            warnings.warn(f"removed {p}, left half-written by an interrupted run.", stacklevel=3)
        fp = fingerprint(config, registry)
        _write_atomic(directory / FINGERPRINT_FILE, json.dumps(fp, indent=1, sort_keys=True) + "\n")
        _write_atomic(directory / "config.yaml", OmegaConf.to_yaml(config))
        yield status
