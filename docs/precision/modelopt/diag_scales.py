"""Diagnostic: activation scales (QuantizeLinear on activations) of our int8 vs ModelOpt graphs, by input tensor."""
import sys, onnx, numpy as np
from onnx import numpy_helper
def scales(p):
    m = onnx.load(p); inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]].ravel()[0]) for n in m.graph.node
            if n.op_type == 'QuantizeLinear' and n.input[0] not in inits and n.input[1] in inits}
g = sys.argv[1]
a = scales(f'w/{g}.int8.onnx'); others = {v: scales(f'mo/{g}.mo_{v}.onnx') for v in sys.argv[2:]}
common = [k for k in a if all(k in o for o in others.values())]
print(len(a), {v: len(o) for v, o in others.items()}, 'common', len(common))
r = {v: np.array([o[k] / a[k] for k in common]) for v, o in others.items()}
for v, x in r.items():
    print(v, 'scale ratio modelopt/ours: min %.3f median %.3f max %.3f' % (x.min(), np.median(x), x.max()))
for k in common[:60]:
    print(f'{k[:60]:60s} ours {a[k]:.4g} ' + ' '.join(f'{v} {o[k]:.4g}' for v, o in others.items()))
