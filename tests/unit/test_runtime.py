"""`ray.mode` -> what Ray is asked to do. Pure parts only; real clusters are in
tests/integration/test_ray_address.py."""

from __future__ import annotations

import socket
import time

import pytest

from flywheel.config import RayConfig
from flywheel.errors import ConfigError, FlywheelError
from flywheel.runtime import RayAddress, ensure_ray, init_kwargs, parse_address, probe, submit_job


def test_local_always_starts_its_own_instance():
    kw = init_kwargs(RayConfig(mode="local", num_cpus=2, object_store_memory_mb=128))
    # "local", not None: None would join a cluster named by RAY_ADDRESS or ray_current_cluster.
    assert kw == {
        "address": "local",
        "include_dashboard": False,
        "log_to_driver": False,
        "num_cpus": 2,
        "object_store_memory": 128 * 1024 * 1024,
    }
    assert init_kwargs(RayConfig()) == {
        "address": "local",
        "include_dashboard": False,
        "log_to_driver": False,
    }


@pytest.mark.parametrize(
    "address", ["10.0.0.5:6379", "ray-head.svc:6379", "ray://ray-head:10001", "auto"]
)
def test_address_mode_passes_the_address_and_nothing_local(address):
    kw = init_kwargs(RayConfig(mode="address", address=address, num_cpus=8))
    # num_cpus / object_store_memory are refused by ray.init when joining a cluster.
    assert kw == {"address": address, "log_to_driver": False}


def test_kuberay_runs_inside_the_rayjob_driver():
    assert init_kwargs(RayConfig(mode="kuberay")) == {"address": "auto", "log_to_driver": False}


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:6379", RayAddress("gcs", "127.0.0.1:6379", "127.0.0.1", 6379)),
        (" head:7000 ", RayAddress("gcs", "head:7000", "head", 7000)),
        ("ray://head:10001", RayAddress("client", "ray://head:10001", "head", 10001)),
        ("ray://head", RayAddress("client", "ray://head", "head", 10001)),
        ("http://head:8265", RayAddress("jobs", "http://head:8265", "head", 8265)),
        ("http://head:8265/", RayAddress("jobs", "http://head:8265", "head", 8265)),
        (
            "https://ray.example.com",
            RayAddress("jobs", "https://ray.example.com", "ray.example.com", 443),
        ),
        ("[::1]:6379", RayAddress("gcs", "[::1]:6379", "::1", 6379)),
        ("auto", RayAddress("auto", "auto")),
    ],
)
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("head", "needs a port"),
        ("head:notaport", "bad port"),
        ("grpc://head:6379", "unknown scheme 'grpc'"),
        ("http://head:8265/api/jobs", "not a Ray address"),
        ("", "not a Ray address"),
    ],
)
def test_parse_address_rejects_with_the_field_named(address, says):
    with pytest.raises(ConfigError, match=says) as err:
        parse_address(address)
    assert "ray.address" in str(err.value)


def test_a_jobs_url_cannot_run_a_stage_in_process():
    with pytest.raises(ConfigError, match=r"Jobs API .*GCS address .*submit_job"):
        init_kwargs(RayConfig(mode="address", address="http://head:8265"))


def test_ensure_ray_refuses_a_jobs_url_before_starting_anything():
    import ray

    with pytest.raises(ConfigError):
        ensure_ray(RayConfig(mode="address", address="https://head:8265"))
    assert not ray.is_initialized()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_fails_fast_in_one_line_naming_the_address():
    addr = parse_address(f"127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(FlywheelError, match=rf"cannot reach Ray at {addr.raw}: ") as err:
        probe(addr)
    assert time.monotonic() - t0 < 2
    assert "\n" not in str(err.value)


def test_probe_passes_when_something_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe(parse_address(f"ray://127.0.0.1:{server.getsockname()[1]}"))
    probe(parse_address("auto"))  # nothing to probe


@pytest.mark.parametrize(
    "cfg",
    [
        RayConfig(mode="local"),
        RayConfig(mode="kuberay"),
        RayConfig(mode="address", address="head:6379"),
    ],
)
def test_submit_job_needs_a_jobs_url(cfg):
    with pytest.raises(ConfigError, match=r"http\(s\)://host:8265"):
        submit_job(cfg, "python -c pass")


def test_submit_job_to_nothing_fails_fast():
    cfg = RayConfig(mode="address", address=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(FlywheelError, match=rf"cannot reach Ray at {cfg.address}"):
        submit_job(cfg, "python -c pass")
