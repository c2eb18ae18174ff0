"""Markdown tables from results.json (for REPORT.md)."""
import json
r = json.load(open('/tmp/modelopt_eval/results.json'))
ORDER = ['ours_int8', 'ours_int8_layers', 'modelopt_entropy', 'modelopt_max', 'modelopt_entropy_exclgate',
         'modelopt_max_exclgate', 'modelopt_entropy_mmconv', 'modelopt_max_mmconv', 'ours_int8_no_output_q']
def q(x):
    s = x['qdq']
    return (f"{s['QuantizeLinear']}/{s['DequantizeLinear']} | {'yes' if s['act_symmetric_per_tensor_int8'] else 'NO'} | "
            f"{'yes' if s['weights_symmetric_per_channel'] else 'NO'} ({s['weights_per_channel_count']}, "
            + ','.join(f"{k.split('_')[-1]}:{v}" for k, v in sorted(s['weights'].items()) if k.startswith('DQ_axis')) + ')')
for key in ['int8', 'int8_heldout']:
    print(f'\n### {key}\n')
    for g, d in r[key].items():
        if not isinstance(d, dict) or 'variants' not in d:
            continue
        print(f'\n**{g}**\n')
        print('| variant | cosine (min) | max_abs | max_rel | Q/DQ nodes | act sym per-tensor int8 | weights sym per-channel (n, axis:count) |')
        print('|---|---|---|---|---|---|---|')
        for v in ORDER:
            if v in d['variants']:
                x = d['variants'][v]
                print(f"| {v} | {x['cosine']:.6f} | {x['max_abs']:.4g} | {x['max_rel']:.4g} | {q(x)} |")
print('\n### fp16\n')
print('| graph | variant | cosine (min) | max_abs | max_rel | Cast nodes | fp16 initializers | ORT-CPU cosine / max_abs (not faithful) |')
print('|---|---|---|---|---|---|---|---|')
for g, d in r['fp16'].items():
    if not isinstance(d, dict) or 'variants' not in d:
        continue
    for v, x in d['variants'].items():
        if v == 'fp32':
            continue
        o = x['ort_cpu']
        print(f"| {g} | {v} | {x['cosine']:.6f} | {x['max_abs']:.4g} | {x['max_rel']:.4g} | {x['Cast_nodes']} | "
              f"{x['fp16_initializers']} | {o['cosine']:.6f} / {o['max_abs']:.4g} |")
