"""ONNX graph tools shared by export, precision and build (onnx only, no torch, no TensorRT): reading and writing
graphs (with external data past protobuf's 2 GB limit) and matching the patterns the exporter emits."""
