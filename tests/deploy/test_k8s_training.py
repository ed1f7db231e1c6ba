"""The multi-node pre-training launchers: the PyTorchJob manifest (its own schema, pod templates against the
Kubernetes schemas, consistent volumes and a training command that parses) and the SLURM script."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import K8S, ROOT, load_yaml_all
from training.config import load_config

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="part of the dev extra")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")

MANIFEST = K8S / "training" / "pytorchjob.yaml"
SCHEMA = Path(__file__).with_name("pytorchjob.schema.json")
SLURM = ROOT / "training" / "launch" / "slurm.sbatch"


def docs() -> list[dict[str, Any]]:
    return load_yaml_all(MANIFEST)


def job() -> dict[str, Any]:
    (found,) = [d for d in docs() if d["kind"] == "PyTorchJob"]
    return found


def pretrain_args(argv: list[str]) -> list[str]:
    """The options after training/pretrain.py, with the config path made absolute (paths are repo-relative)."""
    rest = argv[argv.index("training/pretrain.py") + 1 :]
    return [str(ROOT / a) if a.startswith("training/configs/") else a for a in rest]


def test_pytorchjob_matches_its_schema_and_the_schema_rejects_typos() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = list(validator.iter_errors(job()))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    bad = copy.deepcopy(job())
    bad["spec"]["elasticPolicy"]["rdzvBackned"] = bad["spec"]["elasticPolicy"].pop("rdzvBackend")
    assert list(validator.iter_errors(bad))


def test_pod_template_and_claims_validate_against_kubernetes() -> None:
    version = kubernetes_validate.utils.latest_version()
    for spec in job()["spec"]["pytorchReplicaSpecs"].values():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": spec["template"]}
        kubernetes_validate.validate(template, version, strict=True)
    claims = {d["metadata"]["name"]: d for d in docs() if d["kind"] == "PersistentVolumeClaim"}
    for claim in claims.values():
        kubernetes_validate.validate(claim, version, strict=True)
    pod = job()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert used <= set(claims) and "ReadWriteMany" in claims["aim-pretrain-runs"]["spec"]["accessModes"]
    mounts = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["volumes"]}


def test_pytorchjob_runs_an_elastic_torchrun_with_options_that_parse() -> None:
    spec = job()["spec"]
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and elastic["minReplicas"] <= spec["pytorchReplicaSpecs"]["Worker"][
        "replicas"] <= elastic["maxReplicas"]  # fmt: skip
    (container,) = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["command"] == ["torchrun"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(spec["nprocPerNode"])
    cfg = load_config(pretrain_args(container["args"]))
    assert cfg.checkpoint.dir.startswith("/runs/") and cfg.data.path.startswith("/data/")
    assert cfg.dist.strategy == "fsdp"


def test_slurm_script_is_valid_bash_and_launches_c10d_torchrun_with_options_that_parse() -> None:
    text = SLURM.read_text()
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.M) and "--rdzv-backend c10d" in text
    command = " ".join(line.rstrip("\\").strip() for line in text.splitlines() if not line.startswith("#"))
    argv = shlex.split(command[command.index("srun torchrun") :])
    cfg = load_config(pretrain_args(argv))
    assert cfg.model.flavor == "aim-600M" and cfg.data.path.endswith(".json")
