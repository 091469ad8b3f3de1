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
import pickle; pickle.dump(rows,open("scratch/colour.pkl","wb"))
