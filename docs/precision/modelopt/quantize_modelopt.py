"""Run with /tmp/modelopt_eval/venv/bin/python (nvidia-modelopt 0.47.0).
ModelOpt ONNX PTQ, INT8, on the fp32 graphs of /tmp/modelopt_eval/w, calibrated on the same captured feeds
(first 64 calls per graph, 32 for vae_decoder) that our onnxruntime.quantization int8 graphs used.

usage: quantize_modelopt.py GRAPH METHOD [HP_DTYPE] [--same-excl]
  --same-excl: also exclude the nodes our int8 excluded (cfm_head hi gate); --ops-like-ours: only MatMul/Gemm/Conv
  METHOD: entropy | max ; HP_DTYPE: fp32 (default; non-quantized ops stay fp32, like ours) | fp16 (ModelOpt default)
"""
import os, re, sys, pickle, time, json, shutil
import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from modelopt.onnx.quantization import quantize

W = '/tmp/modelopt_eval/w'
OUT = '/tmp/modelopt_eval/mo'


class ListReader(CalibrationDataReader):
    """Feeds the captured calls one by one, as recorded (mixed shapes allowed). get_first/rewind are used by
    ModelOpt's GEMV detection / multiple calibration passes."""
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)
    def get_next(self):
        return next(self.it, None)
    def get_first(self):
        return self.feeds[0]
    def rewind(self):
        self.it = iter(self.feeds)
    def __len__(self):
        return len(self.feeds)


def main():
    g, method = sys.argv[1], sys.argv[2]
    hp = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith('--') else 'fp32'
    same_excl = '--same-excl' in sys.argv          # exclude the same nodes as our int8 (cfm_head hi gate)
    ops_like_ours = '--ops-like-ours' in sys.argv  # op_types_to_quantize = MatMul/Gemm/Conv, as in ours
    feeds = pickle.load(open(f'/tmp/modelopt_eval/feeds/{g}.pkl', 'rb'))
    tag = f'{g}.mo_{method}' + ('' if hp == 'fp32' else f'_{hp}') + ('_exclgate' if same_excl else '') + ('_mmconv' if ops_like_ours else '')
    # ModelOpt writes intermediates next to the input: work on a private copy of the fp32 graph
    wd = f'{OUT}/work_{tag}'
    os.makedirs(wd, exist_ok=True)
    src = f'{wd}/{g}.onnx'
    shutil.copy(f'{W}/{g}.onnx', src)
    excl = None
    if same_excl:
        man = json.load(open(f'{W}/manifest.json'))
        excl = ['^' + re.escape(n) + '$' for n in man['graphs'][g]['precisions']['int8']['excluded_nodes']]
    t0 = time.perf_counter()
    quantize(src, quantize_mode='int8', calibration_data_reader=ListReader(feeds), calibration_method=method,
             calibration_eps=['cpu'], high_precision_dtype=hp, nodes_to_exclude=excl,
             op_types_to_quantize=['MatMul', 'Gemm', 'Conv'] if ops_like_ours else None,
             output_path=f'{OUT}/{tag}.onnx', log_level='INFO', log_file=f'{OUT}/{tag}.log')
    print(json.dumps({'graph': g, 'method': method, 'high_precision_dtype': hp, 'calls': len(feeds),
                      'nodes_to_exclude': excl, 'ops_like_ours': ops_like_ours, 'seconds': round(time.perf_counter() - t0, 1),
                      'out': f'{OUT}/{tag}.onnx'}))


if __name__ == '__main__':
    main()
