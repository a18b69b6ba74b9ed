"""A local two-node Ray cluster for the tests marked ``ray`` (``make test-ray``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def local_ray_cluster(**environment: str) -> Iterator[object]:
    """A head and a worker node on this machine, one CPU each, with this process connected
    (``ray.init``); yields the ``ray.cluster_utils.Cluster``. The raylets and every worker inherit
    this process's environment, so for the cluster's life it holds no ``IMM_*`` of the caller's, no
    usage report, this checkout on the workers' path, and ``environment``; restored after."""
    import ray
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    for name in [name for name in os.environ if name.startswith("IMM_")]:
        del os.environ[name]
    os.environ.update(
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **environment,
    )
    # Cluster() writes /tmp/ray/ray_current_cluster whatever the temp dir, and fails without the folder.
    Path("/tmp/ray").mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            cluster.shutdown()
            os.environ.clear()
            os.environ.update(saved)
