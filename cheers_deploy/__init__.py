"""cheers-deploy: export, quantize, build and run the Cheers unified multimodal model on NVIDIA GPUs and CPUs.

The base install (numpy, onnxruntime, tokenizers, safetensors, Pillow, OpenCV) runs exported graphs
without PyTorch; the reference model, export and training need ``cheers-deploy[torch]``.
"""

from .constants import VERSION as __version__


def __getattr__(name):  # lazy: importing the package must not import torch
    if name in ("Pipeline", "GenerateOutput", "AnswerOutput"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Pipeline", "GenerateOutput", "AnswerOutput", "__version__"]
