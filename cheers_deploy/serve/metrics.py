"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide).

    cheers_requests_total{route,status}            requests answered, by route and HTTP status (499: client went away)
    cheers_request_duration_seconds{route}         time from the request to the last byte of the response
    cheers_queue_wait_seconds                      time a request waited for the device worker
    cheers_job_duration_seconds{kind}              device time of a request (answer, chat, generate, edit)
    cheers_queue_depth, cheers_inflight_jobs       requests waiting / running (0 or 1)
    cheers_jobs_cancelled_total{reason}            runs stopped early (client_disconnected, timeout)
    cheers_tokens_generated_total                  tokens sampled;  cheers_prompt_tokens_total
    cheers_images_generated_total                  images produced (generations and edits)
    cheers_stage_seconds{stage,phase}              per pipeline stage call (the pipeline's stage observer)
    cheers_ready                                   1 once the model is loaded and warmed up
    cheers_model_info{model,backend,precision}     always 1
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cheers_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("cheers_request_duration_seconds", "request latency to the last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("cheers_queue_wait_seconds", "time waiting for the device worker",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.job_time = Histogram("cheers_job_duration_seconds", "device time of one request", ["kind"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cheers_queue_depth", "requests waiting for the device worker", registry=r)
        self.inflight = Gauge("cheers_inflight_jobs", "requests running on the device worker", registry=r)
        self.cancelled = Counter("cheers_jobs_cancelled", "runs stopped early", ["reason"], registry=r)
        self.tokens = Counter("cheers_tokens_generated", "tokens sampled", registry=r)
        self.prompt_tokens = Counter("cheers_prompt_tokens", "prompt positions (text and image tokens)", registry=r)
        self.images = Counter("cheers_images_generated", "images produced", registry=r)
        self.stage = Histogram("cheers_stage_seconds", "time of one pipeline stage call", ["stage", "phase"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.ready = Gauge("cheers_ready", "1 once the model is loaded and warmed up", registry=r)
        self.info = Gauge("cheers_model_info", "the served model", ["model", "backend", "precision"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
