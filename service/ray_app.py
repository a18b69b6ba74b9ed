"""The service as a Ray Serve application: the same FastAPI app, one copy per replica, on a Ray cluster.

Each replica runs ``service.app.create_app(settings)``, the app ``python -m service`` serves,
behind Serve's ``@serve.ingress``: same endpoints, answers, errors and metric names. Serve's
proxies (one per node, each preferring the replicas of its own node) route requests; inside a
replica the project's batcher gathers them into batches as it does in one process (Serve's
``@serve.batch`` is not used: one batching mechanism). See docs/scaling.md.

Run it on a cluster (or on a local one started for it)::

    python -m service.ray_app                 # IMM_RAY_ADDRESS=auto joins a running cluster
    serve run service.ray_app:build_app       # Serve's CLI; key=value arguments override IMM_RAY_*
    serve deploy serve_config.yaml            # a Serve config file: deploy/kuberay/rayservice.yaml's
                                              # serveConfigV2 is one (KubeRay deploys it)

Configuration: the service's ``IMM_*`` variables and the ``IMM_RAY_*`` ones of :class:`RaySettings`
(replicas, autoscaling, CPUs and GPUs per replica), read and checked where the application is built
(``python -m service.ray_app``, ``serve run``, or on the cluster from a config file's
``runtime_env``); every replica gets those settings as its constructor argument. Bundle paths
must exist on every node that runs a replica (baked into the image, or a shared volume).

Design choices:

* Loading: Serve runs the app's lifespan when a replica starts; the app loads its bundles in the
  background there, and the lifespan here waits for that loading to finish, so that Serve routes
  nothing to a replica before its models are loaded and warmed up (the proxy never sees the 503
  "still loading" a lone ``python -m service`` answers during start-up).
* ``max_ongoing_requests`` (Serve's default 5) caps how many requests a replica holds at once,
  hence its batches: the default here is twice ``IMM_MAX_BATCH_SIZE``, so that one batch gathers
  while the other runs.
* Each answer names the replica and node that computed it (``X-Serve-Replica``, ``X-Serve-Node``).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import ray
from fastapi import FastAPI
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve
from ray.serve.config import AutoscalingConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.settings import Settings
from service.app import create_app

log = logging.getLogger("service.ray")

#: The deployment's name in ``serve status``, the Serve config file and the replica ids.
DEPLOYMENT_NAME = "IMM"
REPLICA_HEADER = b"x-serve-replica"
REQUEST_ID_HEADER = b"x-request-id"
NODE_HEADER = b"x-serve-node"


class RaySettings(BaseSettings):
    """The Ray Serve settings, from ``IMM_RAY_*`` variables (or the builder's arguments, which win).

    ``min_replicas == max_replicas`` runs that many replicas; ``max_replicas > min_replicas`` lets
    Serve's autoscaler keep about ``target_ongoing_requests`` requests on each replica.
    """

    model_config = SettingsConfigDict(env_prefix="IMM_RAY_", extra="forbid", frozen=True)

    address: str | None = Field(
        None,
        description="cluster to join for `python -m service.ray_app` ('auto': the one started by "
        "`ray start` on this machine; none: start a local one)",
    )
    app_name: str = Field("imm", description="the Serve application's name")
    min_replicas: int = Field(1, ge=1, description="replicas always running")
    max_replicas: int = Field(1, ge=1, description="most replicas (above min_replicas: autoscaling)")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="autoscaling target: requests in progress or queued per replica"
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="load must stay high this long before scaling up")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="load must stay low this long before scaling down"
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="window over which the autoscaler averages the load"
    )
    metrics_interval_s: float = Field(
        10.0,
        gt=0,
        description="how often replicas and proxies report their load to the autoscaler (Serve's "
        "AutoscalingConfig.metrics_interval_s, deprecated there for variables that Ray 2.60 does not read yet)",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests one replica holds at once (default: 2 x IMM_MAX_BATCH_SIZE)"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests a proxy keeps waiting for a replica; beyond it 503 (-1: no limit)"
    )
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    gpus_per_replica: float = Field(
        0.0,
        ge=0,
        description="GPUs for each replica (with IMM_RUNTIME/IMM_PROVIDERS choosing the GPU runtime)",
    )
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve checks each replica")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a check slower than this fails")

    @model_validator(mode="after")
    def _replicas_in_order(self) -> RaySettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


class ReplicaHeaders:
    """Names the replica and node of every answer (``X-Serve-Replica``, ``X-Serve-Node``), and leaves
    ``X-Request-ID`` to Serve's proxy.

    The proxy passes its request id (the client's, or a new one) to the app, which answers with it,
    and appends that same header itself: the app's copy is dropped so that the answer carries the
    id once.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        context = serve.get_replica_context()
        self.headers = [
            (REPLICA_HEADER, context.replica_id.to_full_id_str().encode()),
            (NODE_HEADER, ray.get_runtime_context().get_node_id().encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


def replica_app(settings: Settings) -> FastAPI:
    """The service's app for one replica, whose start-up returns once its models are loaded.

    ``create_app``'s lifespan starts loading in the background (so that ``python -m service``
    answers /health at once); under Serve a replica must not take traffic before it can answer,
    so this lifespan waits for the loading to end (loaded, absent or failed: as in one process, a
    missing bundle leaves its endpoint answering 503 and /ready saying why).
    """
    app = create_app(settings, freeze_heap=True)  # a replica's process serves this app alone
    engine = app.state.engine
    app_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_until_loaded(app: FastAPI) -> AsyncIterator[Any]:
        async with app_lifespan(app) as lifespan_state:
            await engine.wait_loaded()
            yield lifespan_state

    app.router.lifespan_context = lifespan_until_loaded
    app.add_outer_middleware(ReplicaHeaders)  # outside the request context, which adds the id
    return app


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class IMMDeployment:
    """One replica: the app of :func:`replica_app` for the settings it was deployed with.

    Serve builds the app when the replica starts (``__serve_build_asgi_app__``), then runs its
    lifespan, which loads the bundles: once per replica.
    """

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return replica_app(self.settings)


def replica_settings(settings: Settings, ray_settings: RaySettings) -> Settings:
    """The settings a replica runs with: bundle paths made absolute (a replica's working directory
    is Ray's, not the caller's), and the inference workers and ONNX Runtime's threads matched to the
    replica's CPUs when left at 0 (the defaults count the node's cores, which oversubscribes a node
    that runs several replicas)."""
    update: dict[str, Any] = {
        name: path.absolute()
        for name, path in (("ner_bundle", settings.ner_bundle), ("re_bundle", settings.re_bundle))
        if path is not None
    }
    if ray_settings.cpus_per_replica >= 1:  # the replica's cores, not the node's
        cores = math.floor(ray_settings.cpus_per_replica)
        workers = settings.inference_workers or (2 if cores >= 2 else 1)
        update["inference_workers"] = workers
        if settings.intra_op_threads == 0:
            update["intra_op_threads"] = max(1, cores // workers)
    return settings.model_copy(update=update)


def deployment_options(ray_settings: RaySettings, settings: Settings) -> dict[str, Any]:
    """The options of the IMM deployment (``Deployment.options`` arguments)."""
    replicas: dict[str, Any]
    if ray_settings.autoscaling:
        replicas = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=ray_settings.min_replicas,
                max_replicas=ray_settings.max_replicas,
                target_ongoing_requests=ray_settings.target_ongoing_requests,
                upscale_delay_s=ray_settings.upscale_delay_s,
                downscale_delay_s=ray_settings.downscale_delay_s,
                look_back_period_s=ray_settings.look_back_period_s,
                # Passed only when changed: Serve warns that the field is deprecated.
                **(
                    {"metrics_interval_s": ray_settings.metrics_interval_s}
                    if ray_settings.metrics_interval_s
                    != RaySettings.model_fields["metrics_interval_s"].default
                    else {}
                ),
            )
        }
    else:
        replicas = {"num_replicas": ray_settings.min_replicas}
    return {
        **replicas,
        "max_ongoing_requests": ray_settings.max_ongoing_requests or 2 * settings.max_batch_size,
        "max_queued_requests": ray_settings.max_queued_requests,
        "health_check_period_s": ray_settings.health_check_period_s,
        "health_check_timeout_s": ray_settings.health_check_timeout_s,
        "ray_actor_options": {
            "num_cpus": ray_settings.cpus_per_replica,
            "num_gpus": ray_settings.gpus_per_replica,
        },
    }


def application(settings: Settings, ray_settings: RaySettings) -> serve.Application:
    """The Serve application for these settings: the IMM deployment, bound to its replicas' settings."""
    deployment = IMMDeployment.options(**deployment_options(ray_settings, settings))
    return deployment.bind(replica_settings(settings, ray_settings))


def build_app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """Serve's application builder: ``IMM_*`` and ``IMM_RAY_*`` settings from the environment, the
    latter overridden by ``args`` (``serve run``'s ``key=value`` arguments, a config file's ``args``).

    Both are checked here, in the process that builds the application, so that a bad value stops
    the deployment at once with its message rather than failing every replica.
    """
    return application(Settings(), RaySettings(**dict(args or {})))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """``python -m service.ray_app``: the application on ``IMM_HOST:IMM_PORT`` (a proxy on every node
    with a replica) until interrupted (Ctrl-C, SIGTERM), then deleted, as ``serve run`` does."""
    try:
        settings = Settings()
        ray_settings = RaySettings()
        app = application(settings, ray_settings)
    except ValidationError as error:
        print(f"invalid IMM_* configuration:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    ray.init(address=ray_settings.address)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=ray_settings.app_name, route_prefix="/")
        replicas = (
            f"{ray_settings.min_replicas} to {ray_settings.max_replicas} replicas (autoscaling)"
            if ray_settings.autoscaling
            else f"{ray_settings.min_replicas} replica(s)"
        )
        log.info("IMM on Ray Serve at http://%s:%d, %s", settings.host, settings.port, replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: deleting the application %r", ray_settings.app_name)
        serve.delete(ray_settings.app_name)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
