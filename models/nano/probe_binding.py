#!/usr/bin/env python3
"""Does the text conditioning bind colours to shapes? Linear probes on a trained pipeline's text encoders (issue 22,
run 15's diagnosis): for every caption "a C1 S1 and a C2 S2" (8 x 7 colour pairs x 5 x 4 shape pairs), the state
of a shape token (CLIP: hidden_states[-2], what the pipeline feeds the transformer; T5: the shape's last piece)
-> a colour, softmax regression on 3/4 of the captions, accuracy on the rest (chance 1/8).

    python models/nano/probe_binding.py RUN/pipeline
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: E402

P = Path(sys.argv[1])
te1=CLIPTextModelWithProjection.from_pretrained(P/'text_encoder').float().eval()
te2=CLIPTextModelWithProjection.from_pretrained(P/'text_encoder_2').float().eval()
te3=T5EncoderModel.from_pretrained(P/'text_encoder_3').float().eval()
text=train.TextStack(te1,te2,te3)
toks=train.load_tokenizers(train.HERE.parent/'fixtures'/'tiny-sd35')
colors=['red','orange','yellow','green','blue','purple','white','black']
shapes=['circle','square','triangle','star','cross']
caps=[];lab=[]
for c1,c2 in itertools.permutations(colors,2):
    for s1,s2 in itertools.permutations(shapes,2):
        caps.append(f"a {c1} {s1} and a {c2} {s2}"); lab.append((colors.index(c1),colors.index(c2)))
ids=train.tokenize(toks,caps,77)
with torch.no_grad():
    o1=te1(ids[0],output_hidden_states=True); o2=te2(ids[1],output_hidden_states=True)
    t5=te3(ids[2])[0]
lab=np.array(lab)
# CLIP: token positions: BOS a c1 s1 and a c2 s2 EOS -> s1 at 3, s2 at 7 (each word one token in CLIP)
def probe(X, y, name):
    n=len(y); rng=np.random.default_rng(0); idx=rng.permutation(n); tr,te=idx[:n*3//4],idx[n*3//4:]
    Xt=torch.tensor(X[tr],dtype=torch.float32); yt=torch.tensor(y[tr]); W=torch.zeros(X.shape[1],8,requires_grad=True); b=torch.zeros(8,requires_grad=True)
    opt=torch.optim.Adam([W,b],lr=0.05)
    mu,sd=Xt.mean(0),Xt.std(0)+1e-6
    for _ in range(500):
        opt.zero_grad(); l=torch.nn.functional.cross_entropy(((Xt-mu)/sd)@W+b,yt); l.backward(); opt.step()
    acc=((((torch.tensor(X[te],dtype=torch.float32)-mu)/sd)@W+b).argmax(1).numpy()==y[te]).mean()
    print(f"{name:55s} held-out accuracy {acc:.3f}")
for enc,o in (('CLIP-L',o1),('CLIP-G',o2)):
    h=o.hidden_states[-2].numpy()
    probe(h[:,7],lab[:,1],f'{enc} state of the 2nd shape token -> its colour')
    probe(h[:,7],lab[:,0],f'{enc} state of the 2nd shape token -> the 1st colour')
    probe(h[:,3],lab[:,0],f'{enc} state of the 1st shape token -> its colour')
# T5: mean of all token states vs colour of object 2 isn't binding; use the state at the last piece of s2: find by tokenizing
t5h=t5.numpy()
pos=[]
for c in caps:
    n=len(toks[2](c, add_special_tokens=False)['input_ids']); pos.append(n-1)
X=np.stack([t5h[i,p] for i,p in enumerate(pos)])
probe(X,lab[:,1],'T5 state of the last piece of the 2nd shape -> its colour')
probe(X,lab[:,0],'T5 state of the last piece of the 2nd shape -> the 1st colour')
