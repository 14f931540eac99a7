"""Services a run needs are reached before any work: each unreachable one is one line naming
the profile field and the service, in seconds, with no password shown."""

from __future__ import annotations

import time

import pytest
from fixtures_services import free_port

from flywheel.config import Profile
from flywheel.preflight import ServiceError, check, problems


def _profile(tmp_path, **sections) -> Profile:
    return Profile(state_dir=str(tmp_path / "state"), **sections)


def test_a_local_profile_needs_no_service(tmp_path):
    assert problems(_profile(tmp_path)) == []


def test_every_unreachable_service_is_named_with_its_field(tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    p = _profile(
        tmp_path,
        registry={"tracking_uri": f"http://{dead}", "retries": 0, "http_timeout_s": 2},
        tune={"storage": f"postgresql+psycopg2://optuna:hunter2@{dead}/optuna"},
    )
    t0 = time.monotonic()
    found = problems(p)
    assert time.monotonic() - t0 < 15
    assert len(found) == 2, found
    tracking, database = found
    assert tracking.startswith(f"registry.tracking_uri (http://{dead}, MLflow tracking server)")
    assert database.startswith("tune.storage (") and "Optuna database" in database
    assert "hunter2" not in database
    with pytest.raises(ServiceError) as err:
        check(p)
    assert "\n" not in str(err.value) and "registry.tracking_uri" in str(err.value)


def test_tuning_disabled_does_not_need_its_database(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    p = _profile(tmp_path, tune={"enabled": False, "storage": f"postgresql://x@{dead}/db"})
    assert problems(p) == []


def test_unreachable_object_storage_names_storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    p = _profile(
        tmp_path,
        storage={"root": "s3://bucket/runs", "endpoint_url": f"http://127.0.0.1:{free_port()}"},
    )
    t0 = time.monotonic()
    (line,) = problems(p)
    assert time.monotonic() - t0 < 30
    assert line.startswith("storage.root") and "s3://bucket/runs" in line


def test_the_plan_step_fails_on_an_unreachable_service_before_recording_anything(tmp_path):
    from flywheel import stages

    dead = f"http://127.0.0.1:{free_port()}"
    p = _profile(tmp_path, registry={"tracking_uri": dead, "retries": 0, "http_timeout_s": 2})
    with pytest.raises(ServiceError, match=r"^registry\.tracking_uri"):
        stages.plan(p.to_param(), "run-1")
    assert not (tmp_path / "state").exists()  # no local store was created in its place
