"""Diagnostic: how many activation QuantizeLinear nodes quantize the OUTPUT of a MatMul/Gemm/Conv (output
quantization: the fp32 consumers such as residual Adds then read the int8-rounded value) and how many
non-MatMul/Gemm/Conv nodes read a DequantizeLinear output."""
import sys, onnx
from collections import Counter
for p in sys.argv[1:]:
    m = onnx.load(p); prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name for t in m.graph.initializer}
    outq = Counter(prod[n.input[0]].op_type for n in m.graph.node if n.op_type == 'QuantizeLinear'
                   and n.input[0] in prod and prod[n.input[0]].op_type in ('MatMul', 'Gemm', 'Conv'))
    dq = {n.output[0] for n in m.graph.node if n.op_type == 'DequantizeLinear'}
    other = Counter(n.op_type for n in m.graph.node if n.op_type not in ('MatMul', 'Gemm', 'Conv', 'QuantizeLinear')
                    and any(i in dq for i in n.input))
    print(f'{p:45s} Q on MatMul/Gemm/Conv outputs: {dict(outq)}  non-GEMM/Conv readers of DQ: {dict(other)}')
