"""The files every command writes: checks of a path before any work, atomic saves, and the
cleanup after a killed writer.

An atomic save writes `<stem>.partial-<pid><ext>` beside its target
(`pruning.tempfiles.partial_path`) and moves it into place once complete (`atomic_path`, `experiments.deploy.write_export`,
`pruning.plan.atomic_write`). A writer killed by SIGKILL leaves that temporary behind;
`remove_partial_files` deletes the ones whose writing process is gone: the next atomic
save into a folder does so, and so does the experiment log (`save_sqlite`) for the folder
of a run it finds dead.

This module imports only the standard library and the library's Keras-free modules
(`pruning.choices`, `pruning.tempfiles`): `save_sqlite` and the report, which import no
TensorFlow, use it.
"""

import contextlib
import errno
import glob
import os
import shutil

from pruning.choices import EXTENSIONS
from pruning.tempfiles import PARTIAL, partial_path


def process_alive(pid):
    """Whether process `pid` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: trust os.kill


def remove_partial_files(folder, pattern=f"*{PARTIAL}*", recursive=False):
    """Deletes the temporary files (and folders: a SavedModel) of atomic saves in `folder`
    whose writing process is gone; returns their paths."""
    root = os.path.join(glob.escape(folder), "**") if recursive else glob.escape(folder)
    removed = []
    for p in glob.glob(os.path.join(root, pattern), recursive=recursive):
        pid = os.path.basename(p).split(PARTIAL, 1)[1].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                removed.append(p)
    return removed


def ensure_writable_dir(path, what="output folder"):
    """Creates folder `path` if needed; a ValueError names it when it cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Cannot use {path!r} as the {what}: it is a file, not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create the {what} {path!r}: {e.strerror}.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write to the {what} {path!r}: permission denied.")
    return path


def check_output_owner(log, path, force=False, option="--output"):
    """Refuses to write `path` when it is a file of a finished run in experiment log `log`
    (its model, the plan beside it, or a copy, plan or results it recorded), unless
    `force`: a ValueError names the run. Every command that writes a user path calls
    this before any work (prune -o, compress --output, --save-plan, --results,
    report, export -o)."""
    if force or log is None or not path:
        return
    owner = log.file_owner(path)
    if owner:
        raise ValueError(f"{path!r} is the {owner[1]} of finished run {owner[0]}; choose another {option} "
                         "(or pass --force to replace it).")


def os_reason(e):
    """Why an OSError happened, in words a user acts on."""
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EISDIR: "it is a folder",
            errno.ENOTDIR: "a part of its path is a file, not a folder"}.get(e.errno, e.strerror or str(e))


def check_writable_file(path, what="output file"):
    """Checks, before the work, that `path` can be written as a file: not a folder, no
    file where a folder of its path should be, and a writable place (its missing
    folders are created when it is written). A ValueError says why not."""
    if os.path.isdir(path):
        raise ValueError(f"Expected a file path for the {what}. Received a folder: {path!r}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"Cannot write the {what} {path!r}: {existing!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        place = "read-only" if _read_only_mount(existing) else "not writable (permission denied)"
        raise ValueError(f"Cannot write the {what} {path!r}: the folder {existing!r} is {place}.")
    return path


def _read_only_mount(folder):
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` (same extension, so Keras accepts it)
    that replaces `path` once the block succeeds, so a crash never leaves half a file.

    The file is created by the writer with the user's umask (not mkstemp's 0600). An
    exception or Ctrl-C/SIGTERM removes it; after a SIGKILL it stays as
    `<name>.partial-<pid><ext>`, which the next atomic save into the same folder (or
    the next open of the log, for a run's folder) deletes once that process is gone.
    A folder as `path`, a file in its path, a read-only place or a full disk is one
    ValueError naming `path`; the previous file at `path` is then untouched.
    """
    check_writable_file(path, "file")
    folder = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(folder)
    tmp = partial_path(os.path.abspath(path))
    remove_partial_files(folder)  # left in this folder by killed writers
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"Cannot write {path!r}: {os_reason(e)} ({e.strerror or e}).") from None
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_text(path, text):
    """Writes a text file atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def check_export_output(path, format):
    """A one-line ValueError when `path` cannot receive this format's export."""
    ext = EXTENSIONS[format]
    if format == "saved_model":
        if os.path.isfile(path):
            raise ValueError(f"A SavedModel is a folder, but {path!r} is a file. Choose another output path.")
        if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path!r} is a folder that is not a SavedModel; choose another output path.")
        return
    if os.path.isdir(path):
        raise ValueError(f"The output {path!r} is a folder. Expected a file path ending in {ext} "
                         f"(e.g. {os.path.join(path, 'model' + ext)!r}).")
    if not path.endswith(ext):
        raise ValueError(f"Expected an output path ending in {ext} for format {format!r}. Received: {path!r}")
    check_writable_file(path, "output")  # a file in its path, a read-only folder: before any run
