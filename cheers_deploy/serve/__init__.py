"""`cheers-deploy serve`: the pipeline as a long-running, OpenAI-compatible HTTP service (docs/serving.md).

    app.py      routes: /v1/chat/completions, /v1/images/generations, /v1/images/edits, /v1/models, /health, /ready,
                /metrics
    gate.py     in front of every route: auth, body limit, 503 while loading/draining, request metrics
    service.py  what the routes share (config, worker, metrics, draining), a handler's view of one job, SSE
    worker.py   the one device thread that owns the pipeline, and the bounded queue in front of it
    schemas.py  request bodies (pydantic), errors.py the OpenAI-style error objects, images.py image input/output
    metrics.py  Prometheus metrics, server.py uvicorn with a draining SIGTERM, loadtest.py the load test

The top layer beside the command line: it imports the runtime and what lies below; only `cli/serve.py` imports it.
Its third-party imports (starlette, uvicorn, pydantic, prometheus-client, python-multipart: the `serve` extra) stay
inside this package; importing `cheers_deploy.serve` itself imports none of them.
"""
