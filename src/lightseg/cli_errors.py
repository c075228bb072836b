"""The one line a verb's failure of the machine prints: an ``OSError`` (disk full, no permission,
too many open files, ...) or too little memory, each with the advice that fits its cause.

Kept apart from :mod:`lightseg.cli`, which parses flags; the CLI decides which exceptions are the
machine's and which are bugs (those keep their traceback).
"""

from __future__ import annotations

import errno

_KEPT = "then rerun (finished work is kept, files are never left half-written)"
_OS_ADVICE = {  # errno -> what to do; path advice only where a path is the cause
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT, errno.EFBIG),
                    f"the disk (or your quota) is full: free space or choose an output folder on another disk, {_KEPT}"),
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS),
                    f"you may not write (or read) there: choose a writable folder or fix its permissions, {_KEPT}"),
    **dict.fromkeys((errno.ENOTDIR, errno.EISDIR, errno.EEXIST),
                    f"a file stands where a folder must be, or the reverse: make sure the path is a writable folder, {_KEPT}"),
    errno.ENOENT: f"it does not exist (or a folder on its path was removed): check the path, {_KEPT}",
    errno.ENAMETOOLONG: f"the path is too long for the file system: choose a shorter one, {_KEPT}",
    errno.ELOOP: f"its symbolic links form a loop: fix or remove them, {_KEPT}",
    errno.EIO: f"the disk reported a read/write error: check the disk, or copy the data to another one, {_KEPT}",
    **dict.fromkeys((errno.EMFILE, errno.ENFILE),
                    f"too many files are open: raise the limit (ulimit -n 4096) or use fewer --workers, {_KEPT}"),
}


def is_out_of_memory(exc: BaseException) -> bool:
    """A MemoryError, or PyTorch's out-of-memory errors (CUDA's, and the CPU allocator's RuntimeError)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(
        words in text for words in ("out of memory", "not enough memory", "can't allocate memory"))


def out_of_memory_line(exc: BaseException) -> str:
    cause = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (f"out of memory ({cause}); use a smaller --patch or --batch (train), --batch-tiles 1 (predict) or fewer "
            "--workers, or a machine with more memory; finished work is kept")


def machine_error_line(exc: OSError) -> str:
    """The path the error names, its cause, and advice that fits that cause. A cause no path
    explains (a dropped connection) gets no path advice; no memory gets the memory advice."""
    if exc.errno == errno.ENOMEM:
        return out_of_memory_line(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    advice = _OS_ADVICE.get(exc.errno or 0)
    if advice is None:
        advice = (f"make sure the path is a writable folder with free space, {_KEPT}" if exc.filename else
                  "a system error, not a problem with your files; rerun (finished work is kept), and report it "
                  "if it repeats")
    return f"{where}{exc.strerror or exc}; {advice}"
