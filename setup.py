from pathlib import Path

import re

from setuptools import find_packages, setup

VERSION = re.search(r'^VERSION = "([^"]+)"', Path(__file__).with_name("cheers_deploy").joinpath("constants.py")
                    .read_text(), re.M).group(1)

BASE = [
    "numpy>=1.24",
    "onnxruntime>=1.18",
    "onnx>=1.16",
    "Pillow>=10",
    "opencv-python-headless>=4.8",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "tqdm>=4.60",
]

setup(
    name="cheers-deploy",
    version=VERSION,
    description="Export, quantize, build and run the Cheers unified multimodal model (ONNX Runtime, TensorRT)",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cheers_deploy", "cheers_deploy.*"]),
    # assets/<model>/graphs: the bundled model's exported fp32 graphs (tools/make_bundled_graphs.py), so a torch-free
    # install runs it with no export step
    package_data={"cheers_deploy": ["assets/*/*", "assets/*.json", "assets/*/graphs/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require={
        # torch==2.13.0 is the CPU wheel this project pins (any other spec pulls GBs of CUDA wheels)
        "torch": ["torch==2.13.0", "onnxslim>=0.1.30", "onnxscript>=0.1", "matplotlib>=3.7"],
        "test": ["pytest>=7", "transformers==4.51.3", "matplotlib>=3.7",
                 # tests/test_serve.py: the server and its clients
                 "starlette>=0.40", "uvicorn>=0.30", "pydantic>=2.5", "prometheus-client>=0.19",
                 "python-multipart>=0.0.9", "httpx>=0.27", "openai>=1.40"],
        # cheers-deploy serve (docs/serving.md); the runtime never imports these
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "pydantic>=2.5", "prometheus-client>=0.19",
                  "python-multipart>=0.0.9"],
        # cuda-python's major must be the CUDA major of the driver/TensorRT: cuda-python 13 needs an R580+ driver and
        # fails on JetPack 6.2 (CUDA 12.6) with cudaErrorInsufficientDriver (docs/jetson.md)
        #   trt-cu12: CUDA 12.x: JetPack 6.x (Orin), TensorRT 10.x for CUDA 12 on x86/SBSA
        #   trt-cu13: CUDA 13.x: JetPack 7 (Thor), TensorRT for CUDA 13
        #   trt:      the same as trt-cu12 (kept for existing installs; JetPack 7 / CUDA 13 needs trt-cu13)
        "trt-cu12": ["polygraphy>=0.49", "cuda-python>=12.6,<13", "nvidia-ml-py>=12.535"],
        "trt-cu13": ["polygraphy>=0.49", "cuda-python>=13,<14", "nvidia-ml-py>=12.535"],
        "trt": ["polygraphy>=0.49", "cuda-python>=12.6,<13", "nvidia-ml-py>=12.535"],
        # onnxruntime-gpu from PyPI is built for CUDA 12
        "gpu": ["onnxruntime-gpu>=1.18", "cuda-python>=12.6,<13", "nvidia-ml-py>=12.535"],
        # bench --energy and the reproducibility fields on a GPU (NVML; pure Python, any architecture)
        "bench": ["nvidia-ml-py>=12.535", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["cheers-deploy=cheers_deploy.cli:main"]},
)
