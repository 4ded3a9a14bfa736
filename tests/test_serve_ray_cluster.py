"""`sdrt serve` on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one CPU
per node) with the demo model's export: a replica on each node. In its own module so that no
other Ray instance of the test session is running (test_serve_ray.py's stops at its module's end).
Ray listens on 127.0.0.1; the test stops the cluster it started."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("httpx")

from test_serve import BLUE, RED, draws, png  # noqa: E402
from test_serve_ray import HEADER, RayServe  # noqa: E402


def test_two_node_cluster_has_a_replica_on_each_node(demo_fp32, monkeypatch):
    """Two Ray nodes on this machine (one CPU each), two replicas of one CPU: one per node, both
    serve images, and a job started on one node is followed from the other. One HTTP proxy (both
    nodes share 127.0.0.1), told not to prefer its own node's replica (as a load balancer in front
    of every node's proxy would spread requests)."""
    from ray.cluster_utils import Cluster
    monkeypatch.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")    # inherited by the nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, namespace="sdrt-test")
        rs = RayServe(demo_fp32, proxy_location="HeadOnly")    # one proxy: both nodes share 127.0.0.1
        try:
            replicas = rs.replicas(2)
            assert len({info["node"] for info in replicas.values()}) == 2, replicas
            seen = set()
            for seed in range(24):       # until both replicas have answered (Ray routes each request)
                r = rs.http.post("/v1/images/generations", json={"prompt": RED, "response_format": "b64_json",
                                                                 "seed": seed})
                assert r.status_code == 200 and draws(png(r.json()["data"][0]["b64_json"]), RED)
                seen.add(r.headers[HEADER])
                if seen == set(replicas):
                    break
            assert seen == set(replicas)
            job_id, owner = rs.job(prompt=BLUE, steps=40, seed=2)
            rs.poll_via_other(f"/v1/jobs/{job_id}", owner, lambda st: st["state"] == "succeeded")
        finally:
            rs.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
