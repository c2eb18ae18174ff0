"""Compare our int8 / fp16 graphs with NVIDIA ModelOpt's, against the fp32 graph, on the captured feeds.

Run with /work/main/.venv/bin/python (cheers_deploy installed; onnxruntime 1.32.0 CPU) and OMP_NUM_THREADS=1:

    python compare.py int8            # ORT CPU, first 16 captured calls per graph
    python compare.py int8_heldout    # ORT CPU, calls 64..79 (not used by any calibration), graphs with >64 calls
    python compare.py fp16 [N]        # onnx.reference.ReferenceEvaluator (faithful fp16), first N (=2) calls

Metrics (cheers_deploy.calibration.common.compare_outputs, per call, then aggregated over the calls):
  cosine  = min over calls and float outputs of cos(out, ref)
  max_abs = max |out - ref|
  max_rel = max over calls/outputs of max|out - ref| / max|ref|
Q/DQ structure: counts of QuantizeLinear/DequantizeLinear, and whether activations are symmetric per-tensor
int8 (scalar scale, zero point 0, int8) and weights symmetric per-channel int8 (vector scale + axis, zero point 0).
Results are merged into /tmp/modelopt_eval/results.json.
"""
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from cheers_deploy.calibration.common import compare_outputs, iter_feeds, topo_sort

ROOT = Path('/tmp/modelopt_eval')
W = ROOT / 'w'
MO = ROOT / 'mo'
RESULTS = ROOT / 'results.json'
GRAPHS = ['vae_encoder', 'vision_tokenizer', 'backbone', 'cfm_head', 'vae_decoder']


# ----------------------------------------------------------------------------------------------- Q/DQ structure
def qdq_stats(path):
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {}
    for n in g.node:                                   # Constant nodes holding scales / zero points
        if n.op_type == 'Constant':
            for a in n.attribute:
                if a.name == 'value':
                    consts[n.output[0]] = a.t

    def arr(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name])
        return None

    def tensor_dtype(name):
        t = inits.get(name) or consts.get(name)
        return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name if t is not None else None

    producers = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops = Counter(n.op_type for n in g.node)
    act = Counter()
    wt = Counter()
    bias = Counter()
    quantized_ops = Counter()
    for n in g.node:
        if n.op_type not in ('QuantizeLinear', 'DequantizeLinear'):
            continue
        axis = next((a.i for a in n.attribute if a.name == 'axis'), None)
        scale = arr(n.input[1])
        zp = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        zp_dtype = tensor_dtype(n.input[2]) if zp is not None else None
        per_tensor = scale is not None and scale.size == 1
        sym = zp is None or not np.any(zp)
        if n.op_type == 'QuantizeLinear':
            if n.input[0] in inits:                     # Q on an fp32 weight (weights not folded)
                kind = wt
            else:
                kind = act
            kind['Q'] += 1
            kind['Q_per_tensor' if per_tensor else 'Q_per_channel'] += 1
            kind['Q_zp0' if sym else 'Q_zp_nonzero'] += 1
            kind[f'Q_zp_{zp_dtype}'] += 1
            if not per_tensor:
                kind[f'Q_axis_{axis}'] += 1
        else:
            x = n.input[0]
            xdt = tensor_dtype(x)
            if x in inits or x in consts:               # folded int weight / int32 bias
                kind = bias if xdt == 'int32' else wt
                kind['DQ'] += 1
                kind[f'DQ_x_{xdt}'] += 1
            elif x in producers and producers[x].op_type == 'QuantizeLinear' and \
                    producers[x].input[0] in inits:
                kind = wt
                kind['DQ'] += 1
                kind['DQ_x_from_Q(weight)'] += 1
            else:
                kind = act
                kind['DQ'] += 1
            kind['DQ_per_tensor' if per_tensor else 'DQ_per_channel'] += 1
            kind['DQ_zp0' if sym else 'DQ_zp_nonzero'] += 1
            if not per_tensor:
                kind[f'DQ_axis_{axis}'] += 1
            for c in consumers.get(n.output[0], []):
                quantized_ops[c.op_type] += 1
    act_sym_pt = act['Q'] > 0 and act['Q_per_tensor'] == act['Q'] and act['Q_zp0'] == act['Q'] \
        and act['Q_zp_int8'] == act['Q'] and act['DQ_zp_nonzero'] == 0 and act['DQ_per_channel'] == 0
    wt_n = wt['DQ']
    wt_sym_pc = wt_n > 0 and wt['DQ_zp_nonzero'] == 0 and wt['DQ_per_channel'] == wt_n
    return {
        'QuantizeLinear': ops['QuantizeLinear'], 'DequantizeLinear': ops['DequantizeLinear'],
        'nodes': len(g.node), 'opset': max(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')),
        'activations': dict(act), 'weights': dict(wt), 'bias': dict(bias),
        'dq_consumer_ops': dict(quantized_ops),
        'act_symmetric_per_tensor_int8': bool(act_sym_pt),
        'weights_symmetric_per_channel': bool(wt_sym_pc),
        'weights_per_tensor_count': wt['DQ_per_tensor'],
        'weights_per_channel_count': wt['DQ_per_channel'],
        'float16_initializers': sum(1 for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT16),
    }


# ----------------------------------------------------------------------------------------------- runners
def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])


def run_ort(sess, feeds):
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for f in feeds:
        outs.append(sess.run(None, {k: f[k] for k in names}))
    return outs


def aggregate(outs, refs):
    per = [compare_outputs(o, r) for o, r in zip(outs, refs)]
    return {'cosine': min(p['cosine'] for p in per), 'max_abs': max(p['max_abs'] for p in per),
            'max_rel': max(p['max_rel'] for p in per),
            'cosine_mean': float(np.mean([p['cosine'] for p in per])), 'calls': len(per)}


def load_results():
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(res):
    RESULTS.write_text(json.dumps(res, indent=2, default=float) + '\n')


# ----------------------------------------------------------------------------------------------- int8
def int8(n_calls=16, skip=0, key='int8', graphs=GRAPHS):
    """skip=0: the first n_calls captured calls (these are among the calibration calls of every variant);
    skip=64 ('int8_heldout'): calls 64..64+n_calls-1, never seen by any calibrator (only graphs with >64 calls)."""
    res = load_results()
    out = res.setdefault(key, {'runtime': f'onnxruntime {ort.__version__} CPUExecutionProvider (1 thread)',
                               'calls_per_graph': n_calls, 'first_call_index': skip})
    for g in graphs:
        feeds = list(iter_feeds(W, g, limit=skip + n_calls))[skip:]
        t0 = time.perf_counter()
        refs = run_ort(ort_session(W / f'{g}.onnx'), feeds)
        variants = {'ours_int8': W / f'{g}.int8.onnx'}
        if (W / f'{g}.int8_layers.onnx').exists():
            variants['ours_int8_layers'] = W / f'{g}.int8_layers.onnx'
        for p in sorted(MO.glob(f'{g}.mo_*.onnx')):
            variants['modelopt_' + p.name[len(g) + 4:-5]] = p
        if (ROOT / 'ours_variants' / f'{g}.ours_no_outq.onnx').exists():   # ablation, see ours_no_outq.py
            variants['ours_int8_no_output_q'] = ROOT / 'ours_variants' / f'{g}.ours_no_outq.onnx'
        rows = {}
        for name, path in variants.items():
            try:
                outs = run_ort(ort_session(path), feeds)
                rows[name] = dict(aggregate(outs, refs), file=str(path), qdq=qdq_stats(path))
            except Exception as e:  # noqa: BLE001
                rows[name] = {'file': str(path), 'error': f'{type(e).__name__}: {e}'[:500]}
            r = rows[name]
            print(f"{g:17s} {name:32s} " + (f"cos {r['cosine']:.6f} max_abs {r['max_abs']:.4g} "
                                            f"max_rel {r['max_rel']:.4g} Q {r['qdq']['QuantizeLinear']} "
                                            f"DQ {r['qdq']['DequantizeLinear']} "
                                            f"actSymPT {r['qdq']['act_symmetric_per_tensor_int8']} "
                                            f"wSymPC {r['qdq']['weights_symmetric_per_channel']}"
                                            if 'error' not in r else r['error']), flush=True)
        out[g] = {'feed_shapes': sorted({str({k: v.shape for k, v in f.items() if 'past' not in k}) for f in feeds}),
                  'variants': rows, 'seconds': round(time.perf_counter() - t0, 1)}
        save_results(res)


# ----------------------------------------------------------------------------------------------- fp16
def fp16(n_calls=2):
    """Faithful fp16 numbers: onnx.reference.ReferenceEvaluator runs every node in its declared dtype (numpy)."""
    from onnx.reference import ReferenceEvaluator

    res = load_results()
    out = res.setdefault('fp16', {'runtime': f'onnx.reference.ReferenceEvaluator (onnx {onnx.__version__}); '
                                             f'fp32 reference also by ReferenceEvaluator',
                                  'calls_per_graph': n_calls})
    out['calls_per_graph'] = n_calls
    for g in ['vae_decoder', 'vision_tokenizer']:
        feeds = list(iter_feeds(W, g, limit=n_calls))
        variants = {'fp32': W / f'{g}.onnx', 'ours_fp16': W / f'{g}.fp16.onnx'}
        for p in sorted(MO.glob(f'{g}.autocast*.onnx')):
            variants['modelopt_' + p.name[len(g) + 1:-5]] = p
        outs_by = {}
        rows = {}
        for name, path in variants.items():
            m = onnx.load(str(path))
            topo_sort(m.graph)
            t0 = time.perf_counter()
            try:
                ev = ReferenceEvaluator(m)
                names = [i.name for i in m.graph.input]
                outs_by[name] = [ev.run(None, {k: f[k] for k in names}) for f in feeds]
            except Exception as e:  # noqa: BLE001
                rows[name] = {'file': str(path), 'error': f'{type(e).__name__}: {e}'[:500]}
                print(g, name, rows[name]['error'], flush=True)
                continue
            dt = time.perf_counter() - t0
            ops = Counter(n.op_type for n in m.graph.node)
            n16 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
            rows[name] = {'file': str(path), 'seconds': round(dt, 1), 'Cast_nodes': ops['Cast'],
                          'fp16_initializers': n16, 'nodes': len(m.graph.node),
                          'io_dtypes': [onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                                        for v in list(m.graph.input) + list(m.graph.output)]}
        refs = outs_by.get('fp32')
        for name in list(rows):
            if name == 'fp32' or 'error' in rows[name]:
                continue
            rows[name].update(aggregate(outs_by[name], refs))
            # also the ORT-CPU number (NOT faithful fp16: ORT CPU upcasts nodes without fp16 kernels)
            try:
                o2 = run_ort(ort_session(rows[name]['file']), feeds)
                r2 = run_ort(ort_session(W / f'{g}.onnx'), feeds)
                rows[name]['ort_cpu'] = aggregate(o2, r2)
            except Exception as e:  # noqa: BLE001
                rows[name]['ort_cpu'] = {'error': f'{type(e).__name__}: {e}'[:300]}
            r = rows[name]
            print(f"{g:17s} {name:28s} cos {r['cosine']:.6f} max_abs {r['max_abs']:.4g} max_rel {r['max_rel']:.4g} "
                  f"Cast {r['Cast_nodes']} fp16 inits {r['fp16_initializers']} ({r['seconds']} s)", flush=True)
        out[g] = {'variants': rows}
        save_results(res)


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    what = sys.argv[1] if len(sys.argv) > 1 else 'int8'
    if what == 'int8':
        int8(int(sys.argv[2]) if len(sys.argv) > 2 else 16)
    elif what == 'int8_heldout':
        int8(16, skip=64, key='int8_heldout', graphs=['vision_tokenizer', 'backbone', 'cfm_head'])
    elif what == 'fp16':
        fp16(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    elif what == 'qdq':
        print(json.dumps(qdq_stats(sys.argv[2]), indent=1))
