"""The temporary file of an atomic write: `<stem>.partial-<pid><ext>` beside its target.

The library's writes (`pruning.plan.atomic_write`) and the experiments' (`experiments.files`)
name it here, and `experiments.files.remove_partial_files` finds the ones a killed writer
left behind. This module imports only the standard library.
"""

import os

PARTIAL = ".partial-"


def partial_path(path):
    """The temporary path beside `path` that this process writes before moving it into place;
    it keeps the extension (and Keras' double `.weights.h5`), so a loader still accepts it."""
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    if stem.endswith(".weights"):
        stem, ext = stem[:-len(".weights")], ".weights" + ext
    return os.path.join(folder, f"{stem}{PARTIAL}{os.getpid()}{ext}")
