"""Writing outputs so they appear only when complete, and never over what a user owns.

Every output directory is built under a temporary sibling name and renamed into
place at the end; every file is written to a temporary name and `os.replace`d.
A killed run therefore leaves either the old output or the new one, never half
of one. Directories effspec made carry a marker file, so `--force` only ever
replaces effspec's own outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from effspec.errors import UserError

MARKER = "effspec.json"


def cache_dir() -> Path:
    """Where converted builtin models are cached ($EFFSPEC_CACHE, else the user cache dir)."""
    env = os.environ.get("EFFSPEC_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("effspec"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s directory, to be renamed to `path` when complete.

    mkstemp creates it 0600; it gets the mode an ordinary new file would (0666 less the umask), so that what
    effspec writes can be read by whoever reads the user's other files (a server, a container).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def marker_kind(out: Path) -> str | None:
    """What effspec wrote `out` as ("model", "spectrum"), or None if effspec did not write it."""
    import json

    try:
        return str(json.loads((out / MARKER).read_text()).get("kind", "model"))
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(out: Path, force: bool, kind: str) -> None:
    """Refuse to touch an existing path unless it is effspec's own output of `kind` and `force` is set."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    found = marker_kind(out)
    if found is None:
        raise UserError(f"{out}: exists and was not written by effspec (no {MARKER}); choose another --out")
    if found != kind:
        raise UserError(f"{out}: holds an effspec {found} output, not a {kind}; choose another --out")
    if not force:
        raise UserError(f"{out}: already exists; pass --force to replace it or choose another --out")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes.

    An existing `out` (already vetted by `check_output_dir`) is swapped out and
    removed only after the new one is in place.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would keep the model from anyone else (a server, a container)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
