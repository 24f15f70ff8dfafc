"""The plant's orchestration path: `prefect deploy --all` from prefect.yaml onto a Prefect server, and a process
worker running a deployment's flow in the project, as infra/README.md sets it up (no `flow.serve` shortcut)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import REPO_ROOT
from tests.serving.conftest import (
    APPROVED,
    free_port,
    make_tiny_model,
    register_model_file,
    write_probe_images,
    write_project,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = "defectops-process"
CLONE_POOL = "defectops-gpu"  # the Kubernetes pool's name; a process pool here


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def run_on_worker(deployment: str, pool: str, env: dict[str, str], cwd: Path, worker_cwd: Path,
                  timeout: float = 300) -> object:
    """Start a run of `deployment`, let one process worker started in `worker_cwd` execute it; the flow run."""
    from prefect.client.orchestration import get_client

    started = prefect_cli(["deployment", "run", deployment], env, cwd)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started)
    assert run_id, started
    prefect_cli(["worker", "start", "--pool", pool, "--run-once"], env, worker_cwd, timeout=timeout)

    async def flow_run() -> object:
        async with get_client() as client:
            return await client.read_flow_run(UUID(run_id.group(1)))

    return asyncio.run(flow_run())


def test_deployments_from_prefect_yaml_run_on_a_process_worker(tmp_path: Path, prefect_server) -> None:
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from components.config import Settings
    from components.registry.tracking import MODEL_NAME, connect
    from components.serving.deployment import read_record

    # the plant's checkout: the project (params, tracked images) with the repository's flows and prefect.yaml
    project, home = write_project(tmp_path / "project"), tmp_path / "home"
    shutil.copytree(REPO_ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    settings = Settings(project=project, home=home).ensure()
    write_probe_images(settings)
    version = register_model_file(settings, make_tiny_model(tmp_path / "model.pt"),
                                  {"gate_status": "passed", **APPROVED})
    connect(settings).set_registered_model_alias(MODEL_NAME, "champion", version)
    mlflow.set_tracking_uri(None)  # connect() exported it for this process only

    api = PREFECT_API_URL.value()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_HOME"))}
    env.update({"PREFECT_API_URL": api, "DEFECTOPS_PROJECT": str(project), "DEFECTOPS_HOME": str(home),
                "HOME": str(tmp_path / "user-home"), "PYTHONPATH": str(REPO_ROOT),
                "DEFECTOPS_SERVICE_URL": f"http://127.0.0.1:{free_port()}", "BENTOML_DO_NOT_TRACK": "true"})
    prefect_cli(["work-pool", "create", POOL, "--type", "process"], env, project)
    prefect_cli(["--no-prompt", "deploy", "--all"], env, project)

    async def deployments() -> dict[str, object]:
        async with get_client() as client:
            found = await client.read_deployments()  # the session's server: other tests deploy to other pools
            return {d.name: d for d in found if d.work_pool_name == POOL}

    deployed = asyncio.run(deployments())
    assert set(deployed) == {"monthly-retraining", "daily-drift", "promote-approved"}
    monthly = deployed["monthly-retraining"]
    assert monthly.work_pool_name == POOL and monthly.entrypoint == "flows/monthly_flow.py:monthly_retraining"
    assert [s.schedule.cron for s in monthly.schedules] == ["0 2 1 * *"]
    assert monthly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert deployed["daily-drift"].parameters == {"trigger_retraining": True, "cooldown_days": 7,
                                                  "timezone": "Europe/Berlin"}  # the window: params.yaml
    run = run_on_worker("promote-approved/promote-approved", POOL, env, project, project)
    assert run.state.is_completed(), (run.state.type, run.state.message)
    assert run.deployment_id == deployed["promote-approved"].id
    record = read_record(settings)
    assert record is not None and record.model_version == f"{MODEL_NAME}/{version}"
    assert record.bento and (home / "bentoml" / "bentos" / record.bento.replace(":", "/")).is_dir(), record.bento
    tags = connect(settings).get_model_version(MODEL_NAME, version).tags
    mlflow.set_tracking_uri(None)
    assert tags["deployment_status"] == "serving" and tags["deployed_by"] == "promote-approved flow", tags


def test_a_git_clone_deployment_of_the_monthly_loop_runs_in_a_fresh_clone(tmp_path: Path, prefect_server) -> None:
    """The Kubernetes training Job's shape (infra/README.md), on a process worker: the flow run starts in an
    empty folder with no DEFECTOPS_PROJECT (infra/worker/Dockerfile) and prefect.yaml's git_clone pull step clones
    the team's repository. The monthly flow then imports the month's images on top of the committed version
    (pulled from the DVC remote), pushes the images and then the dataset commit (DEFECTOPS_GIT_REMOTE=origin),
    trains and registers: the next clone sees the new version."""
    import yaml
    from prefect.settings import PREFECT_API_URL

    from components.config import Settings, load_params
    from components.data.importer import import_data
    from components.data.versioning import DatasetRepo
    from components.registry.registry import list_versions
    from components.registry.tracking import MODEL_NAME, connect
    from tests.conftest import make_imagefolder
    from tests.integration.test_training_flow import TINY_PROFILE

    def git(folder: Path, *args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    remote, origin = tmp_path / "dvc-remote", tmp_path / "defectops.git"  # the plant's S3 bucket and git server
    checkout = write_project(tmp_path / "checkout")  # an engineer's checkout, where the project began
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["train"]["profile"] = "tiny"
    params["train"]["profiles"]["tiny"] = TINY_PROFILE
    params["evaluate"]["n_boot"] = 50
    params["evaluate"]["gate"].update(min_macro_f1=0.0, min_defect_detection_rate=0.0, max_false_alarm_rate=1.0)
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO_ROOT / "flows", checkout / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    new_month = make_imagefolder(tmp_path / "new-month", per_class=4, seed=5)
    (checkout / "prefect.yaml").write_text(yaml.safe_dump({
        "name": "defectops", "prefect-version": "3.8.8", "build": None, "push": None,
        "deployments": [{"name": "monthly-retraining-gpu", "entrypoint": "flows/monthly_flow.py:monthly_retraining",
                         "parameters": {"new_data": str(new_month)}, "work_pool": {"name": CLONE_POOL},
                         "pull": [{"prefect.deployments.steps.git_clone": {"repository": str(origin)}}]}]}))
    engineer = Settings(project=checkout, home=tmp_path / "checkout-home", dvc_remote=str(remote)).ensure()
    first = import_data(str(make_imagefolder(tmp_path / "batch", per_class=8)), engineer,
                        load_params(engineer.params_file))
    assert first.pushed, first.push_message
    git(checkout, "add", "-A")
    git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project")
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(origin)], check=True)

    job_dir, job_home = tmp_path / "srv-project", tmp_path / "srv-defectops"  # the Job's WORKDIR and claim
    job_dir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_HOME", "DEFECTOPS_"))}
    env.update({"PREFECT_API_URL": PREFECT_API_URL.value(), "DEFECTOPS_HOME": str(job_home),
                "DEFECTOPS_DVC_REMOTE": str(remote), "DEFECTOPS_GIT_REMOTE": "origin",
                "HOME": str(tmp_path / "user-home"), "PYTHONPATH": str(REPO_ROOT)})
    prefect_cli(["work-pool", "create", CLONE_POOL, "--type", "process"], env, checkout)
    prefect_cli(["--no-prompt", "deploy", "--all"], env, checkout)
    run = run_on_worker("monthly-retraining/monthly-retraining-gpu", CLONE_POOL, env, checkout, job_dir,
                        timeout=600)
    assert run.state.is_completed(), (run.state.type, run.state.message)
    assert not any(job_dir.iterdir()), "the flow run worked in its clone, not in the worker's folder"

    pushed = git(origin, "log", "-1", "--format=%H %s", "main")
    assert pushed.split(" ", 1)[1].startswith("data: version "), "the Job pushed its dataset commit"
    month_version = pushed.split()[3]
    assert month_version != first.version and month_version in git(origin, "show", "main:data.dvc")
    job = Settings(project=checkout, home=job_home)  # the Job's state: its own claim
    [version] = list_versions(job)
    assert version["dataset_version"] == month_version and "challenger" in version["aliases"]
    assert connect(job).get_model_version(MODEL_NAME, version["version"]).tags["git_commit"] == pushed.split()[0]

    subprocess.run(["git", "clone", "-q", str(origin), str(tmp_path / "next-clone")], check=True)
    next_clone = Settings(project=tmp_path / "next-clone", home=tmp_path / "next-home", dvc_remote=str(remote))
    DatasetRepo(next_clone.ensure()).restore()  # next month's Job gets this month's images from the remote
    assert sum(1 for f in (next_clone.data_dir / "images").rglob("*.png")) == 3 * 8 + 3 * 4


def test_each_deployment_runs_one_flow_run_at_a_time(tmp_path: Path, prefect_server) -> None:
    """prefect.yaml's deployment concurrency limits reach the server: a run due while the previous one still
    runs is cancelled by Prefect (CANCEL_NEW), not started to fail on the project's lock."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.settings import PREFECT_API_URL

    project, pool = tmp_path / "project", "defectops-limits"  # its own pool: the tests above create POOL
    shutil.copytree(REPO_ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        deployment["name"] += "-limits"  # beside the tests above, which read every deployment of the server
        deployment["work_pool"]["name"] = pool
    (project / "prefect.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DEFECTOPS_"))}
    env.update({"PREFECT_API_URL": PREFECT_API_URL.value(), "DEFECTOPS_PROJECT": str(project),
                "DEFECTOPS_HOME": str(tmp_path / "home"), "HOME": str(tmp_path / "user-home"),
                "PYTHONPATH": str(REPO_ROOT)})
    prefect_cli(["work-pool", "create", pool, "--type", "process"], env, project)
    prefect_cli(["--no-prompt", "deploy", "--all"], env, project)

    async def deployments() -> dict[str, object]:
        async with get_client() as client:
            return {d.name: d for d in await client.read_deployments() if d.work_pool_name == pool}

    deployed = asyncio.run(deployments())
    assert set(deployed) == {"monthly-retraining-limits", "daily-drift-limits", "promote-approved-limits"}
    for name, deployment in deployed.items():
        assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1, name
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW, name
    monthly = deployed["monthly-retraining-limits"]
    assert monthly.parameters == {"timezone": monthly.schedules[0].schedule.timezone} == {"timezone": "Europe/Berlin"}
