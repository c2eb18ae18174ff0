"""Ablation (run with /work/main/.venv/bin/python): our quantize_static settings (cheers_deploy/calibration/quantize.py:
QDQ, MatMul/Gemm/Conv, per-channel, symmetric int8, same excluded nodes, same 64/32 captured calls) plus
extra_options OpTypesToExcludeOutputQuantization=[MatMul, Gemm, Conv] (ModelOpt's TRT-guided setting: do not
quantize the outputs of the quantized ops). Method: entropy, same _ragged_histograms patch as the package.
Writes mo/<g>.ours_no_outq.onnx (the mo/ folder, so compare.py picks it up as modelopt_... -> renamed below)."""
import sys, json
import onnx
from onnxruntime import quantization as q
from cheers_deploy.calibration.quantize import ShardReader, _ragged_histograms, OP_TYPES
W = '/tmp/modelopt_eval/w'
man = json.load(open(f'{W}/manifest.json'))
for g in sys.argv[1:]:
    info = man['graphs'][g]['precisions']['int8']
    names = [t['name'] for t in man['graphs'][g]['inputs']]
    reader = ShardReader(W, g, names, 64)
    with _ragged_histograms(q):
        q.quantize_static(f'{W}/{g}.onnx', f'/tmp/modelopt_eval/ours_variants/{g}.ours_no_outq.onnx', reader,
                          quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES), per_channel=True,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.Entropy, nodes_to_exclude=info['excluded_nodes'],
                          extra_options={'ActivationSymmetric': True, 'WeightSymmetric': True,
                                         'OpTypesToExcludeOutputQuantization': list(OP_TYPES)})
    print(g, 'calls', len(reader), 'excluded', len(info['excluded_nodes']))
