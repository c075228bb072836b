"""File I/O shared by every stage: atomic writes and NIfTI reading with clear errors.

Every file lightseg writes goes through :func:`atomic_write` (temp file in the same folder, then
``os.replace``), so a kill or a full disk leaves either the complete old file, the complete new
file, or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from lightseg.errors import ImageError, OutputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TEMP_GRACE_S = 2.0  # a temp file this young may be between its creation and its writer's lock
TEMP_MARK = ".lightseg-"  # in every temp file name: cleanup touches lightseg's own temp files only
_TEMP_NAME = re.compile(r"^\..+\.lightseg-[A-Za-z0-9_]+\.tmp$")
LOCK_NAME = ".lightseg.lock"
_HELD_LOCKS: set[int] = set()  # descriptors of the folder locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker, a pool process), point the inherited lock
    descriptors at /dev/null: an ``flock`` lasts while any descriptor shares it, so workers left
    running for a few seconds after their parent was killed would otherwise keep the run folder
    locked against the ``--resume`` that follows. The descriptor numbers stay valid."""
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _HELD_LOCKS:
        os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)
_UMASK = os.umask(0)
os.umask(_UMASK)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a device or other special file"


def why_not_a_folder(path: Path, what: str) -> str:
    """Why ``path``, given as the ``what`` folder, cannot be read as one: missing, or a file (a
    careless ``-i scan.nii.gz`` is not a missing folder). The caller names the path."""
    if path.is_file():
        return f"is a file, not a folder; pass the {what} folder"
    return f"{what} folder does not exist"


def _below_a_file(path: Path) -> str:
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
    return (f"{blocker}: is a file, so {path} cannot be created below it; make sure the path is a writable folder "
            "(or choose another one)")


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as a file lightseg may (re)write: absent or a regular file, never a link or a folder.

    A link is refused rather than replaced or followed: following it writes wherever it points (a
    planted link is a way to overwrite another user's files), and replacing it silently breaks what
    the user linked. Links among the parent folders are fine.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except NotADirectoryError as exc:
        raise OutputError(_below_a_file(path)) from exc
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is {_kind(mode)}, not a regular file; lightseg never writes through links "
                          "or into special files: remove it or choose another output path")
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder to write into: absent (it is created) or a folder, or a link to one."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise OutputError(f"{path}: is a symbolic link to nothing; remove it or make it point to a folder") from None
        return path
    except NotADirectoryError as exc:
        raise OutputError(_below_a_file(path)) from exc
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is {_kind(mode)}, not a folder; give a folder path (it is created if missing)")
    return path


RAW_DATA_SET, CACHE, RUN_FOLDER = "a raw data set", "a preprocessed cache", "a run folder"
FOLDER_KINDS = {  # what a folder holds, told by its marker files (a trailing "/" marks a folder)
    RAW_DATA_SET: ("dataset.json", "imagesTr/"),
    CACHE: ("plan.json", "cases/"),
    RUN_FOLDER: ("config.json", "checkpoint_latest.pth"),
}


def holds(path: Path, kind: str) -> bool:
    """Whether ``path`` has every marker of ``kind`` (a key of :data:`FOLDER_KINDS`)."""
    return all((path / m).is_dir() if m.endswith("/") else (path / m).is_file() for m in FOLDER_KINDS[kind])


def folder_kind(path: Path) -> str | None:
    """Which of :data:`FOLDER_KINDS` ``path`` holds (the first whose markers are all there), or None."""
    return next((kind for kind in FOLDER_KINDS if holds(path, kind)), None)


def check_output_kind(path: Path, allowed: str | None, writes: str) -> None:
    """Refuse an output folder that holds another kind of folder than ``allowed`` (a key of
    :data:`FOLDER_KINDS`, or None: none of them): ``writes`` would land among its files and replace
    those of the same name (``preprocess RAW -o OTHER_RAW`` replaced the other data set's dataset.json)."""
    kind = folder_kind(path) if path.is_dir() else None
    if kind is not None and kind != allowed:
        raise OutputError(f"{path}: holds {kind}; {writes} would be mixed with its files (and replace any of the same "
                          "name, such as its dataset.json): choose a new folder (it is created)")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it vanishes.

    ``path`` must be absent or a regular file (:func:`check_output_file`). The temp file is made
    with ``O_EXCL`` (``mkstemp``), so a link planted under a temp name is never followed, and its
    name carries ``TEMP_MARK`` so that :func:`remove_stale_temps` knows it as lightseg's. Errors
    name ``path``, never the temp file.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp")
        with os.fdopen(fd, mode) as handle:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the temp file as in use
            yield handle
            handle.flush()
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, path)  # still locked, so remove_stale_temps never takes it
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and (exc.filename is None or TEMP_MARK in str(exc.filename)):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the target, not a temp name
        raise


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete the temp files of writers that died mid-write (a kill), never a live writer's.

    A live :func:`atomic_write` holds an exclusive lock on its temp file; the kernel drops it when
    the process dies. The lock is taken just after the file is created, before anything is
    written, so an empty temp file younger than ``TEMP_GRACE_S`` is kept too. Two processes may
    thus share a folder (two ``predict`` runs, two trainings preprocessing one cache) without one
    deleting the other's file in flight.

    Only names :func:`atomic_write` makes are touched, and only regular files: a link or a FIFO
    under such a name is neither followed nor opened (opening a FIFO would block).
    """
    for tmp in Path(folder).glob(f".*{TEMP_MARK}*.tmp"):
        if not _TEMP_NAME.match(tmp.name):
            continue
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                continue
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    continue
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a writer holds it
                if info.st_size or time.time() - info.st_mtime > TEMP_GRACE_S:
                    os.unlink(tmp)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy ``source`` to ``target`` through :func:`atomic_write` (never through a link at ``target``)."""
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _read_holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _holder_alive(holder: tuple[int, str] | None) -> bool:
    """Whether a recorded holder may still run: always when on another host (it cannot be checked
    from here), else when its pid exists."""
    if holder is None or holder[0] == os.getpid():
        return False
    if holder[1] != socket.gethostname():
        return True
    try:
        os.kill(holder[0], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "this folder") -> Iterator[Path]:
    """Own ``folder`` while the block runs; a second owner gets :class:`OutputError` naming the holder.

    The lock is an ``flock`` on ``FOLDER/.lightseg.lock``, which holds the owner's pid and host
    for the message. The kernel drops an ``flock`` when its process dies, however it dies (a
    SIGKILL, an out-of-memory kill), so a dead owner's lock never blocks: the file may stay, the
    lock does not. Where the file system has no ``flock`` (some network mounts), the recorded
    pid is checked instead: a holder on this host whose pid is gone is stale and replaced; one on
    another host is taken as alive. The file is opened without following links.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_UMASK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link; remove it (lightseg never follows links)") from exc
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    with os.fdopen(fd, "r+") as handle:
        holder = _read_holder(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        except OSError:  # no flock here (ENOLCK, EOPNOTSUPP): fall back to the recorded pid
            busy = _holder_alive(holder)
        if busy:
            who = f"process {holder[0]} on host {holder[1]}" if holder else "another process"
            raise OutputError(f"{folder}: {who} is using {what} (lock {path}); wait for it to finish or stop it, "
                              "or choose another folder")
        handle.truncate(0)
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        _HELD_LOCKS.add(fd)
        try:
            yield folder
        finally:
            _HELD_LOCKS.discard(fd)
            handle.seek(0)
            handle.truncate(0)  # released: nothing for the pid check to find


def read_json(path: str | os.PathLike, error: type[Exception], advice: str) -> Any:
    """Parse a JSON file; a missing, unreadable, binary, truncated or absurdly nested one is
    ``error`` naming the file, the cause and ``advice``."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise error(f"{path}: not found; {advice}") from exc
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise error(f"{path}: not valid JSON ({detail}); {advice}") from exc


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save an array as ``.npy`` (no pickles, memory-mappable), atomically."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def strip_nifti_suffix(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_NIFTI_MAGICS = {344: (b"n+1\0", b"ni1\0"), 4: (b"n+2\0", b"ni2\0")}  # NIfTI-1 at byte 344, NIfTI-2 at 4


def _header_bytes(path: Path) -> bytes | None:
    """The file's first 540 bytes (decompressed when gzipped); ``None`` if the gzip stream is broken."""
    try:
        with open(path, "rb") as raw:
            start = raw.read(2)
            raw.seek(0)
            if start != b"\x1f\x8b":
                return raw.read(540)
            with gzip.GzipFile(fileobj=raw) as unzipped:
                return unzipped.read(540)
    except (OSError, EOFError, zlib.error):
        return None


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why nibabel could not open ``path``: not a NIfTI file at all, or a NIfTI file cut short."""
    header = _header_bytes(path)
    if header is not None and not any(header[at:at + 4] in magics for at, magics in _NIFTI_MAGICS.items()):
        kind = "an empty file" if not header else "no NIfTI header (no n+1/ni1 or n+2 magic)"
        return (f"{path}: not a NIfTI file ({kind}; nibabel: {type(exc).__name__}: {exc}); export or convert it "
                "to NIfTI (.nii.gz), or remove it from the folder")
    where = "its gzip stream is broken" if header is None else "it ends before its data does"
    return (f"{path}: cannot read this NIfTI file ({where}; {type(exc).__name__}: {exc}); "
            "it is corrupt or truncated, re-export or re-copy it")


def _out_of_memory(path: Path, image: Any) -> str:
    shape = tuple(int(n) for n in image.shape)
    gib = float(np.prod(shape, dtype=np.float64)) * 4 / 2**30
    return (f"{path}: out of memory while reading it (shape {shape} is {gib:.1f} GiB as float32); free memory, use "
            "a machine with more, or check the header's dimensions")


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI header and check that its data can be read; raise :class:`ImageError` if not.

    The voxel data is read once here (nibabel reads lazily), so a truncated gzip stream is found
    now and named, instead of failing later deep inside preprocessing. Each cause has its own
    words: not a NIfTI file, corrupt or truncated, out of memory, RGB or complex voxels (which
    would otherwise be cast silently: a complex image to its real part). Read as ITK (and so
    nnU-Net) reads them: a ``(X, Y, Z, 1)`` file as 3-D, and a file whose name says ``.gz`` when
    its bytes are plain (or the reverse) as its bytes say.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not a NIfTI file; name the files in it ({path / '*.nii.gz'})")
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except MemoryError as exc:
        raise ImageError(f"{path}: out of memory while opening it; free memory or use a machine with more") from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        image = _load_by_content(path)
        if image is None:
            raise ImageError(_unreadable(path, exc)) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(f"{path}: not a NIfTI image (nibabel read it as {type(image).__name__}); convert it to NIfTI")
    dtype = image.get_data_dtype()
    if dtype.names is not None:
        raise ImageError(f"{path}: an RGB (colour) image ({dtype}); lightseg needs one grey value per voxel: "
                         "convert it to greyscale, or save each colour as its own channel file")
    if dtype.kind == "c":
        raise ImageError(f"{path}: complex-valued voxels ({dtype}); lightseg does not drop the imaginary part "
                         "silently: save the magnitude (or the part you mean) as a real-valued image")
    try:
        if len(image.shape) > 3 and all(n == 1 for n in image.shape[3:]):
            image = _without_trailing_axes(image)
        image.get_fdata(dtype=np.float32, caching="fill")
    except MemoryError as exc:
        raise ImageError(_out_of_memory(path, image)) from exc
    except Exception as exc:  # the header was read: the data is cut short or its gzip stream broken
        raise ImageError(
            f"{path}: cannot read this NIfTI file's voxels ({type(exc).__name__}: {exc}); "
            "it is corrupt or truncated, re-export or re-copy it"
        ) from exc
    return image


def _load_by_content(path: Path) -> nib.Nifti1Image | nib.Nifti2Image | None:
    """A single-file NIfTI whose name says gzip when its bytes are plain, or the reverse (nibabel
    goes by the name and fails), read as its bytes say, as ITK (and so nnU-Net) reads it; ``None``
    for anything else."""
    try:
        raw = path.read_bytes()
        gzipped = raw[:2] == b"\x1f\x8b"
        if gzipped == path.name.endswith(".gz"):
            return None  # the name is right: the file itself is broken
        data = gzip.decompress(raw) if gzipped else raw
        kind = {b"n+1\0": nib.Nifti1Image, b"n+2\0": nib.Nifti2Image}
        klass = next((kind[data[at:at + 4]] for at in _NIFTI_MAGICS if data[at:at + 4] in kind), None)
        return klass.from_bytes(data) if klass else None
    except Exception:  # cut short or corrupt after all: the caller names it
        return None


def _without_trailing_axes(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """``(X, Y, Z, 1)`` (a 4-D header with one volume, as some converters write 3-D scans) as
    ``(X, Y, Z)`` on the same grid: ITK, and so nnU-Net, reads such files as 3-D."""
    data = np.asanyarray(image.dataobj).reshape(image.shape[:3])
    header = image.header.copy()
    header.set_data_dtype(data.dtype)
    out = type(image)(data, image.affine, header)
    out.set_qform(image.get_qform(), code=int(image.header["qform_code"]))
    out.set_sform(image.get_sform(), code=int(image.header["sform_code"]))
    return out


def voxel_spacing(image: nib.Nifti1Image) -> tuple[float, ...]:
    """Spacing in mm along each voxel axis, from the affine (robust to a stale pixdim)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def save_nifti(path: str | os.PathLike, data: np.ndarray, reference: nib.Nifti1Image) -> None:
    """Write ``data`` on exactly ``reference``'s grid (affine, qform and sform codes), atomically."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    out = nib.Nifti1Image(data, reference.affine, header)
    out.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    payload = out.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)  # level 1: 5x faster, ~same size on masks
    with atomic_write(path, "wb") as handle:
        handle.write(payload)
