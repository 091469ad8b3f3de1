"""Grain colour and area per file-index range of the shared rice folder: where the photographic
batches change. python benchmarks/rice_batches.py"""
import os, re, numpy as np
from PIL import Image
root="/work/shared/data/rice/Rice_Image_Dataset"
rows=[]
for v in sorted(os.listdir(root)):
    d=os.path.join(root,v)
    if not os.path.isdir(d): continue
    for f in os.listdir(d):
        m=re.search(r"\((\d+)\)",f)
        n=int(m.group(1))
        a=np.asarray(Image.open(os.path.join(d,f)).convert("RGB"),np.float32)
        mask=a.sum(-1)>60  # grain pixels
        g=a[mask]
        rows.append((v,n,*g.mean(0), mask.mean()))


# Mean grain colour and area per 1,000-index range, per variety (the table in docs/rice.md).
for v in sorted({r[0] for r in rows}):
    r = [x for x in rows if x[0] == v]
    n = np.array([x[1] for x in r]); c = np.array([x[2:5] for x in r]); a = np.array([x[5] for x in r])
    print(v, len(r), "images, indices", n.min(), "-", n.max())
    for lo in range(0, 15000, 1000):
        s = (n > lo) & (n <= lo + 1000)
        if s.sum():
            print(f"  {lo + 1:5d}-{lo + 1000:5d} n={s.sum():3d} G-R={(c[s, 1] - c[s, 0]).mean():5.1f} "
                  f"B-R={(c[s, 2] - c[s, 0]).mean():5.1f} area={a[s].mean():.3f}")
