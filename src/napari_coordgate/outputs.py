"""Where and how every output is written: one rule for every output of every command, the CLI's and the dock's.

Every file is written atomically (:func:`atomic_write`: a temporary file in the same folder, flushed, renamed),
so nothing looks complete before it is. An output never overlaps an input: it is not the input (after resolving
links, also through a hard link), not a folder that holds an input (``apply raw.zarr/data -o raw.zarr`` would
delete ``data``), and not a path inside an input (``-o img.ome.zarr/0``). Two outputs of one command never name
the same file either. No torch, no Qt.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

__all__ = ["OutputError", "real_path", "check_outputs", "atomic_write", "atomic_write_bytes"]


class OutputError(ValueError):
    """An output that would overwrite or delete an input (or another output); the message says which."""


def real_path(path: str | os.PathLike) -> Path:
    """``path`` absolute, with every link resolved (a path that does not exist yet: its existing part).

    ``realpath`` alone: it follows a link before it applies a ``..`` after it (``abspath`` first would drop
    ``link/..`` as text and name another file than the one the system opens).
    """
    return Path(os.path.realpath(os.fspath(path)))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # does not exist (yet)
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[int, int]]:
    """The identities of ``path`` and of each of its existing ancestors: what a file system means by the path,
    whatever its spelling (case-insensitive file systems, hard links)."""
    ids = [_identity(p) for p in (path, *path.parents)]
    return [i for i in ids if i is not None]


def _relation(out: Path, inp: Path) -> str | None:
    """How ``out`` would harm ``inp``: 'is', 'holds', 'inside' or None (by path, then by file identity)."""
    if out == inp:
        return "is"
    if out in inp.parents:
        return "holds"
    if inp in out.parents:
        return "inside"
    out_id, inp_id = _identity(out), _identity(inp)
    if out_id is not None and out_id == inp_id:
        return "is"
    if out_id is not None and out_id in _chain(inp)[1:]:
        return "holds"
    if inp_id is not None and inp_id in _chain(out)[1:]:
        return "inside"
    return None


_WORDS = {
    "is": "is the input {inp}",
    "holds": "holds the input {inp} (writing it would delete or replace the input)",
    "inside": "lies inside the input {inp}",
}


def check_outputs(outputs: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike],
                  inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse outputs that overlap an input or each other, before anything is read or written.

    Parameters
    ----------
    outputs
        The paths a command will write, or a mapping {path: what it is} for the message ("report", "model").
        Include every path a writer touches, such as the ``.partial`` store an OME-Zarr output is built in.
    inputs
        The paths it reads (``None`` entries and paths that do not exist are skipped).

    Raises
    ------
    OutputError
        One line naming the output and the input (or the other output) it overlaps.
    """
    named = dict(outputs) if isinstance(outputs, Mapping) else {p: "output" for p in outputs}
    # only what exists can be harmed (a missing input fails with its own message when it is read)
    ins = [(p, real_path(p)) for p in inputs if p is not None and str(p) != "" and os.path.lexists(p)]
    seen: dict[Path, str] = {}
    for out, what in named.items():
        real = real_path(out)
        for given, inp in ins:
            rel = _relation(real, inp)
            if rel is not None:
                raise OutputError(f"refusing to write the {what} {out}: it {_WORDS[rel].format(inp=given)}; "
                                  "choose another output")
        if real in seen:
            raise OutputError(f"the {what} {out} and the {seen[real]} are the same file; give each its own path")
        seen[real] = f"{what} {out}"


def _file_mode(path: Path) -> int:
    """The permissions of a file written at ``path``: the replaced file's, or 0666 less the process's umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    try:  # Linux: the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` atomically: the one writer of every file the package writes.

    ``write(tmp)`` fills a temporary file in the same folder (a model's bytes, a TIFF, a memory-mapped TIFF filled
    plane by plane); it is then flushed to disk (fsync) and renamed over ``path``. A crash, a full disk or an
    exception in ``write`` leaves the old file (or none) and no temporary file, never half a file. The folder must
    exist (callers check it with their own message).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mode = _file_mode(path)
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600; the file gets the mode a plain open would give (after writing:
        # a read-only mode must not lock the writer out of its own temporary file)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); :class:`FileNotFoundError` naming the folder if
    it is missing."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
