"""A Triton Inference Server model repository for the Cheers pipeline (docs/deploy-triton.md).

cheers-deploy does not grow cluster logic: `cheers-deploy triton` hands an exported workdir to Triton, which does the
scale-out (instances per device, queues, metrics, several replicas behind a load balancer).

    REPO/
      cheers_repository.json         what was generated, from which workdir, with which options (Triton ignores files)
      cheers_generate/               prompt + settings -> image (uint8 HxWx3)
        config.pbtxt
        warmup/                      the warm-up request's inputs
        1/model.py                   the Python backend model: cheers_deploy.triton.python_model.GenerateModel
        1/workdir/                   a copy of the workdir (or a reference to it: --reference)
      cheers_chat/                   messages or prompt (+ image) -> text, decoupled: one response per text delta
        config.pbtxt, warmup/, 1/model.py, 1/workdir/ (hard links to cheers_generate's copy where possible)

Modules: `repository` writes it, `python_model` runs inside Triton's Python backend (one Pipeline per model
instance), `local` starts a real `tritonserver` on this machine for the tests and the load test, `loadtest` measures
it against the offline pipeline.
"""

from .repository import CHAT_MODEL, GENERATE_MODEL, MODELS, RepositoryOptions, write_repository

__all__ = ["CHAT_MODEL", "GENERATE_MODEL", "MODELS", "RepositoryOptions", "write_repository"]
