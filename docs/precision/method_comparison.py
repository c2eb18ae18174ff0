# per-graph cosine of int8 variants vs fp32 on captured calls: 16 seen (first) + held-out calls 64..79
import sys, json, shutil
from pathlib import Path
from cheers_deploy.calibration import quantize as Q
from cheers_deploy.calibration.common import iter_feeds, compare_outputs, GRAPHS
from cheers_deploy.calibration.convert import GraphRun
from cheers_deploy.runtime.manifest import Manifest
W = Path("/tmp/qcmp/w")
if not W.exists():
    shutil.copytree("/tmp/w_final", W)
man = Manifest.load(W)
res = {}
for method in ("minmax", "entropy", "percentile"):
    for outq in (True, False):
        tag = f"{method}{'+outq' if outq else ''}"
        res[tag] = {}
        for g in GRAPHS:
            f = f"{g}.{tag.replace('+','_')}.onnx"
            Q.quantize_graph(W, g, method, out_name=f, man=man, register_as=None, quantize_outputs=outq)
            ref = GraphRun(man.graph_path(g), allow_reference=False); run = GraphRun(W / f, allow_reference=False)
            feeds = list(iter_feeds(W, g, limit=80))
            seen = [compare_outputs(run(x), ref(x))["cosine"] for x in feeds[:16]]
            unseen = [compare_outputs(run(x), ref(x))["cosine"] for x in feeds[64:80]]
            res[tag][g] = (min(seen), min(unseen) if unseen else None)
            print(tag, g, "%.5f" % min(seen), "%.5f" % min(unseen) if unseen else "-", flush=True)
json.dump(res, open("/tmp/qcmp/res.json", "w"), indent=1)
