"""The temporary files of atomic saves, and the cleanup after a killed writer.

An atomic save writes `<stem>.partial-<pid><ext>` beside its target and moves it into
place once complete (`experiments.common.atomic_path`, `experiments.deploy.write_export`,
`pruning.plan.atomic_write`). A writer killed by SIGKILL leaves that temporary behind;
`remove_partial_files` deletes the ones whose writing process is gone: the next atomic
save into a folder does so, and so does the experiment log (`save_sqlite`) for the folder
of a run it finds dead.

This module imports nothing outside the standard library: `save_sqlite`, which imports
no TensorFlow, uses it.
"""

import contextlib
import glob
import os
import shutil

PARTIAL = ".partial-"


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
