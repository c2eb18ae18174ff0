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
        "gpu": ["onnxruntime-gpu>=1.18", "cuda-python>=12.0"],
        "trt": ["polygraphy>=0.49", "cuda-python>=12.0"],
    },
    entry_points={"console_scripts": ["cheers-deploy=cheers_deploy.cli:main"]},
)
