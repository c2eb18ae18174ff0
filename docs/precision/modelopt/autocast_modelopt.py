"""Run with /tmp/modelopt_eval/venv/bin/python: ModelOpt AutoCast fp16 (keep_io_types=True) of vae_decoder and
vision_tokenizer. calibration_data = the first 16 captured calls stacked along the batch axis in one .npz
(ModelOpt splits it back into 16 batch-1 calls). Default thresholds data_max=512, init_max=65504, providers=['cpu'].
Outputs mo/<g>.autocast_fp16.onnx, and mo/<g>.autocast_fp16_blocklist.onnx with op_types_to_exclude = our
SENSITIVE_OPS (cheers_deploy/calibration/convert.py) to compare the converters with the same fp32 op list."""
SENSITIVE_OPS = ["LayerNormalization", "InstanceNormalization", "BatchNormalization", "GroupNormalization",
                 "RMSNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
                 "Reciprocal", "Div", "Exp", "Erf", "Sin", "Cos", "Range"]
import sys, pickle, time, json
import numpy as np, onnx
from modelopt.onnx.autocast import convert_to_mixed_precision
KEEPNORM = '--keepnorm' in sys.argv
for g in [a for a in sys.argv[1:] if not a.startswith('--')]:
    feeds = pickle.load(open(f'/tmp/modelopt_eval/feeds/{g}.pkl', 'rb'))[:16]
    npz = f'/tmp/modelopt_eval/feeds/{g}_16.npz'
    np.savez(npz, **{k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]})
    variants = (('autocast_fp16', None), ('autocast_fp16_blocklist', SENSITIVE_OPS))
    if KEEPNORM:
        variants = (('autocast_fp16_keepnorm', ['InstanceNormalization', 'LayerNormalization']),)
    for tag, excl in variants:
        t0 = time.perf_counter()
        m = convert_to_mixed_precision(f'/tmp/modelopt_eval/w/{g}.onnx', low_precision_type='fp16',
                                       keep_io_types=True, calibration_data=npz, providers=['cpu'],
                                       op_types_to_exclude=excl)
        onnx.save(m, f'/tmp/modelopt_eval/mo/{g}.{tag}.onnx')
        print(json.dumps({'graph': g, 'variant': tag, 'seconds': round(time.perf_counter() - t0, 1),
                          'opset': [o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')]}))
# (appended) third variant, run with: autocast_modelopt.py --keepnorm GRAPH...: only normalizations kept in fp32
