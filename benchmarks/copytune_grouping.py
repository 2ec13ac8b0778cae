"""Experiment (issue 12): a contrastive fine-tune of the grouping network, then the cut sweep in its space.

    STEPS=150 python benchmarks/copytune_grouping.py     # ~4 min tune + ~5 min embedding on 2 cores

Groups all of TRAIN in the product's space (whitened ImageNet, cached in /tmp/wbc-sweep-cache by
benchmarks/sweep_grouping.py), then fine-tunes EfficientNet-Lite0 with SimCLR's loss: each step takes 32 images of
different groups, two ``core.groups.dataset_like`` copies each, batch-norm statistics frozen, AdamW (network
1e-4, projection head 1e-3), temperature 0.1. It then runs sweep_grouping with the tuned network (its own cache,
``OUTCACHE``). The product now does this itself (core.groups.copy_tune, on a 2,000-image sample); this script is the first
experiment, kept so that its table in docs/RIGOR.md can be reproduced.
"""
import sys, time, os, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests'), str(ROOT / 'benchmarks')]
from core import groups as G
from core.data import build_manifest
torch.manual_seed(0)
STEPS, B, LR, TAU = int(os.environ.get('STEPS', 150)), 32, float(os.environ.get('LR', 1e-4)), 0.1
cache = Path('/tmp/wbc-sweep-cache/centre-c200-s128-v4')
man = build_manifest(Path(os.environ.get('DATA', ROOT.parent / 'shared/data/blood-cells')), None)
train = man.split('TRAIN').reset_index(drop=True)
et = G.embed_images(train.path.tolist(), train.sha1.tolist(), cache)
w = G.whitening(train, et, cache)
emb = G.project(G.centre(et), w)
grp = G.groups_from_embeddings(train, emb)
gids = np.unique(grp); print(len(gids), 'groups')
members = {g: np.nonzero(grp == g)[0] for g in gids}
model, mean, std = G._get_model('cpu')
model.train()
for m in model.modules():
    if isinstance(m, nn.BatchNorm2d): m.eval()  # keep ImageNet statistics
head = nn.Sequential(nn.Linear(1280, 512), nn.ReLU(), nn.Linear(512, 128))
opt = torch.optim.AdamW([{'params': model.parameters(), 'lr': LR}, {'params': head.parameters(), 'lr': 1e-3}], weight_decay=1e-4)
mt = torch.tensor(mean).view(1, 3, 1, 1) * 255; st = torch.tensor(std).view(1, 3, 1, 1) * 255
rng = np.random.default_rng(0)
pool = ThreadPoolExecutor(2)
def copies(path, seed):
    r = np.random.default_rng(seed)
    with Image.open(path) as im: src = im.convert('RGB')
    return [G._centre_square(G.dataset_like(src, r), G.CROP, G.SIZE) for _ in range(2)]
t0 = time.time()
for step in range(STEPS):
    pick = rng.choice(gids, B, replace=False)
    idx = [rng.choice(members[g]) for g in pick]
    pairs = list(pool.map(lambda a: copies(train.path[a[0]], a[1]), zip(idx, rng.integers(1 << 31, size=B))))
    x = torch.from_numpy(np.stack([p[0] for p in pairs] + [p[1] for p in pairs])).permute(0, 3, 1, 2).float()
    x = ((x - mt) / st).contiguous(memory_format=torch.channels_last)
    z = F.normalize(head(model.features(x)), dim=1)
    sim = z @ z.T / TAU
    sim.fill_diagonal_(-1e9)
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    loss = F.cross_entropy(sim, target)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0: print(step, f'{loss.item():.3f}', f'{time.time() - t0:.0f}s', flush=True)
model.eval()
os.makedirs('/tmp/contrast', exist_ok=True)
torch.save(model.state_dict(), '/tmp/contrast/model.pt')
print('trained', time.time() - t0)
G._MODEL_CACHE['cpu'] = (model.to(memory_format=torch.channels_last), mean, std)
import sweep_grouping as S
G._get_model = lambda *a: G._MODEL_CACHE['cpu']
sys.argv = ['sweep', '--loader', 'centre', '--crop', '200', '--size', '128', '--views', '4', '--whiten', '600',
            '--cache', os.environ.get('OUTCACHE', '/tmp/contrast/cache'), '--cuts', '0.4,0.45,0.5,0.525,0.55,0.575,0.6,0.625,0.65,0.675,0.7,0.75']
S.main()
