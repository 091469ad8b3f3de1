"""Rebuilds data/rice_sample: 100 images per variety drawn (seed 0) from the shared
Rice_Image_Dataset folder, across its whole file-index range, re-encoded at 96x96
(JPEG quality 90) so the sample stays small. File names keep the dataset's numbering,
so `--split-by batch` works on the sample too.

    python data/make_rice_sample.py [SRC] [DST]

SRC defaults to the shared dataset beside the checkout (../shared/data/rice/Rice_Image_Dataset),
DST to data/rice_sample next to this script.
"""
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "shared", "data", "rice", "Rice_Image_Dataset")
DST = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "rice_sample")
PER_CLASS, SIZE, QUALITY = 100, 96, 90

rng = np.random.default_rng(0)
for variety in sorted(d for d in os.listdir(SRC) if os.path.isdir(os.path.join(SRC, d))):
    files = sorted(os.listdir(os.path.join(SRC, variety)))
    os.makedirs(os.path.join(DST, variety), exist_ok=True)
    for i in sorted(rng.choice(len(files), PER_CLASS, replace=False)):
        img = Image.open(os.path.join(SRC, variety, files[i])).convert("RGB")
        img.resize((SIZE, SIZE), Image.LANCZOS).save(os.path.join(DST, variety, files[i]), quality=QUALITY)
print(f"wrote {PER_CLASS} images per variety to {DST}")
