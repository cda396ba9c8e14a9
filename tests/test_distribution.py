"""Data parallelism gives the single-device numbers for the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import check_per_replica_queues, small_model, to_numpy

WORKER = Path(__file__).with_name("distribution_worker.py")
TF_WORKER = Path(__file__).with_name("tf_distribution_worker.py")
TORCH_WORKER = Path(__file__).with_name("torch_distribution_worker.py")
# A small CLIP ResNet image tower (batch norm throughout); contrastive terms only.
RESNET = {
    "vocabulary_size": 1000,
    "image_encoder": "resnet",
    "vision_width": 8,
    "vision_layers": (1, 1),
    "vision_heads": 2,
    "ss_weight": 0.0,
    "mlm_weight": 0.0,
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _run(command: list[str], **env: str) -> dict:
    result = subprocess.run(
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_same(report: dict, terms: tuple[str, ...]) -> None:
    single_terms, single_grads = report["single"]
    parallel_terms, parallel_grads = report["parallel"]
    for name in terms:
        np.testing.assert_allclose(parallel_terms[name], single_terms[name], rtol=1e-4)
    assert single_grads.keys() == parallel_grads.keys()
    for path, summary in single_grads.items():
        np.testing.assert_allclose(
            parallel_grads[path], summary, rtol=1e-4, atol=1e-7, err_msg=path
        )
    if "fit" in report:
        assert all(np.isfinite(v[0]) for v in report["fit"].values())


def _assert_per_replica_heads(heads: dict) -> None:
    """Each replica's SimSiam and MLM terms are those of its half alone (their
    mean is the reported term), not the whole batch's."""
    for name, reference in heads["reference"].items():
        assert heads["parallel"][name] == pytest.approx(reference, rel=1e-5), name
    assert heads["whole"]["ss_loss"] != pytest.approx(
        heads["reference"]["ss_loss"], rel=1e-3
    )


@pytest.mark.one_backend("jax", reason="keras.distribution is JAX's")
@pytest.mark.slow
def test_jax_data_parallel_matches_one_device(tmp_path):
    """One device's terms and gradients; and with a queue per device (as
    `train` builds it), each device's queue lives on it, holds its own rows
    after a `fit` step and is the only one its rows search."""
    model = small_model(vocabulary_size=1000)
    model.save(tmp_path / "model.keras")
    small_model(vocabulary_size=1000, queue_replicas=2).save(tmp_path / "queues.keras")
    report = _run(
        [sys.executable, str(WORKER), str(tmp_path / "model.keras"),
         str(tmp_path / "queues.keras")],
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )  # fmt: skip
    assert len(report["devices"]) == 2
    _assert_same(report, ("loss", "clip_loss", "nn_loss", "ss_loss"))
    queue = report["queue"]
    assert queue["queue_shards"] == [[1, 64, 128], [1, 64, 128]]
    check_per_replica_queues(
        queue, queue["queues"], np.asarray(queue["queries"]), np.asarray(queue["found"])
    )


@pytest.mark.one_backend("jax", reason="jax.distributed is JAX's")
@pytest.mark.slow
def test_two_jax_processes_match_one_device(tmp_path):
    """The global batch split over two processes' devices (joined by
    `jax.distributed`) gives one device's terms and gradients, SimSiam's and
    MLM's included (global-batch semantics under JAX)."""
    small_model(vocabulary_size=1000).save(tmp_path / "model.keras")
    command = [sys.executable, str(WORKER), str(tmp_path / "model.keras")]
    stdout = _side_by_side(command, _jax_processes(2))[0]
    report = json.loads(stdout.strip().splitlines()[-1])
    _assert_same(report, ("loss", "clip_loss", "nn_loss", "ss_loss"))


@pytest.mark.one_backend("tensorflow", reason="tf.distribute is TensorFlow's")
@pytest.mark.slow
def test_tf_mirrored_strategy_matches_one_device(tmp_path):
    """Contrastive and NN terms with gathered keys, and the gradients of their
    sum, on two logical CPUs equal one device's. (SimSiam's batch norm uses
    per-replica statistics under tf.distribute, as in the released code, so it
    is off for the comparison and on for the `fit` run.)"""
    small_model(vocabulary_size=1000, ss_weight=0.0, mlm_weight=0.0).save(
        tmp_path / "contrastive.keras"
    )
    small_model(vocabulary_size=1000).save(tmp_path / "declip.keras")
    small_model(**RESNET).save(tmp_path / "resnet.keras")
    report = _run(
        [sys.executable, str(TF_WORKER), str(tmp_path / "contrastive.keras"),
         str(tmp_path / "declip.keras"), str(tmp_path / "resnet.keras")],
        KERAS_BACKEND="tensorflow",
    )  # fmt: skip
    assert report["replicas"] == 2
    _assert_same(report, ("loss", "clip_loss", "nn_loss"))
    # Two steps of each replica's 4 rows, two text views each, in its queue.
    assert report["queue_pointer"] == 2 * 2 * 4
    queue = report["queue"]
    check_per_replica_queues(
        queue, queue["queues"], np.asarray(queue["queries"]), np.asarray(queue["found"])
    )
    # SimSiam's batch norm and MLM's mean are per replica, as released, with
    # MLM targets packed per replica slice: each replica's half alone.
    assert report["heads"]["packed_slots"] < 16
    _assert_per_replica_heads(report["heads"])
    # The ResNet's batch norm is synchronised (SyncBN, as released): its
    # statistics over two replicas' halves are the whole batch's.
    statistics = report["batch_norm"]
    assert len(statistics["single"]) >= 8
    for path, single in statistics["single"].items():
        np.testing.assert_allclose(
            statistics["parallel"][path], single, rtol=1e-4, atol=1e-6, err_msg=path
        )


@pytest.mark.one_backend("torch", reason="torchrun is torch's")
@pytest.mark.slow
def test_torchrun_processes_match_one_process(tmp_path, shape_shards):
    """Two torchrun processes (gloo, CPU), each with half the global batch,
    give one process's terms and gradients; a 2-step `train` under torchrun
    ends where one process does. (SimSiam's batch norm is per process, as in
    the released code, and MLM's mean is per process: both off here.)"""
    small_model(vocabulary_size=1000, ss_weight=0.0, mlm_weight=0.0).save(
        tmp_path / "contrastive.keras"
    )
    small_model(vocabulary_size=1000).save(tmp_path / "declip.keras")
    out = tmp_path / "report.json"
    command = [*TORCHRUN, "--nproc_per_node=2", str(TORCH_WORKER)]
    done = subprocess.run(
        [
            *command,
            str(tmp_path / "contrastive.keras"),
            str(tmp_path / "declip.keras"),
            str(out),
        ],  # fmt: skip
        env={**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    _assert_same(report, ("loss", "clip_loss", "nn_loss"))
    _assert_per_replica_heads(report["heads"])
    queue = report["queue"]
    check_per_replica_queues(
        queue, queue["queues"], np.asarray(queue["queries"]), np.asarray(queue["found"])
    )

    train = ["-m", "declip_keras", "train", "--data", shape_shards]
    train += ["--batch-size", "8", "--steps", "2", "--checkpoint-every", "1"]
    for item in ("image_size=32", "context_length=16", "queue_size=64",
                 "vision_layers=1", "text_layers=1"):  # fmt: skip
        train += ["--set", item]
    pointers = {}
    for processes in (1, 2):
        output = tmp_path / f"run{processes}"
        done = subprocess.run(
            [
                *TORCHRUN,
                f"--nproc_per_node={processes}",
                *train,
                "--output",
                str(output),
            ],
            env={**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((output / "summary.json").read_text())
        assert summary["steps"] == 2
        model = keras.models.load_model(output / "model.keras")
        pointers[processes] = int(keras.ops.convert_to_numpy(model.queue.pointer))
    # Every process enqueues its own rows' two text views each step.
    assert pointers[1] == 2 * 2 * 8
    assert pointers[2] == 2 * 2 * 4


def _free_ports(count: int) -> list[int]:
    import socket

    probes = [socket.socket() for _ in range(count)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


def _launch(command: list[str], envs: list[dict]) -> list[subprocess.Popen]:
    """`command` started once per environment (over this one, without
    XLA_FLAGS: one device per process)."""
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [
        subprocess.Popen(
            command,
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]


def _jax_processes(count: int) -> list[dict]:
    """The environments of `count` processes joined by `jax.distributed`."""
    (port,) = _free_ports(1)
    env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": str(count)}  # fmt: skip
    return [{**env, "JAX_PROCESS_ID": str(index)} for index in range(count)]


def _side_by_side(command: list[str], envs: list[dict]) -> list[str]:
    """`_launch`es `command`; every process must succeed. Their stdouts."""
    processes = _launch(command, envs)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def _tf_workers(count: int) -> list[dict]:
    """The environments of `count` TensorFlow workers of one loopback cluster."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(count)]}
    return [
        {
            "KERAS_BACKEND": "tensorflow",
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        for index in range(count)
    ]


def _train_command(shards: str, output: Path, *extra: str) -> list[str]:
    """`declip-keras train` of a small model, batches of 8."""
    train = [sys.executable, "-m", "declip_keras.cli", "train", "--data", shards]
    train += ["--batch-size", "8", "--output", str(output), *extra]
    for item in ("image_size=32", "context_length=16", "queue_size=64",
                 "vision_layers=1", "text_layers=1"):  # fmt: skip
        train += ["--set", item]
    return train


def _assert_only_the_first_wrote(run: Path, stdouts: list[str], steps: list[int]):
    """The checkpoints of `steps`, one summary of the last of them (8 pairs a
    step) and one TensorBoard event file (a second writer would add its own)
    in one folder."""
    assert len(list((run / "logs").rglob("events.out.tfevents.*"))) == 1
    assert f'"steps": {steps[-1]}' in stdouts[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"ckpt-{step:08d}.keras" for step in steps]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps[-1]
    assert summary["data"]["pairs_trained"] == 8 * steps[-1]


@pytest.mark.one_backend("jax", reason="jax.distributed is JAX's")
@pytest.mark.slow
def test_two_jax_processes_train_fail_together_and_resume_through_the_cli(
    tmp_path, shape_shards
):
    """Two `declip-keras train` processes joined by `jax.distributed` on
    loopback (gloo collectives, one CPU device each) train one model: each
    says at start how the run is spread and which shards it reads, only the
    first writes the run's files, and the saved queues hold both devices'
    slices. SIGKILL to one of them right after the first checkpoint makes the
    other exit 1 within the stall timeout (not wait in a collective), and
    `--resume` on both ends where the uninterrupted run did."""
    steps = ["--steps", "6", "--checkpoint-every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    stdouts = _side_by_side(_train_command(shape_shards, full, *steps),
                            _jax_processes(2))  # fmt: skip
    for index, stdout in enumerate(stdouts):
        assert (
            "jax.distributed, keras.distribution.DataParallel: 2 process(es), "
            "2 device(s); global batch 8, 4 per device; "
            f"process {index} reads 1 of 2 shards."
        ) in stdout
    _assert_only_the_first_wrote(full, stdouts, [2, 4, 6])
    model = keras.models.load_model(full / "model.keras")
    features = keras.ops.convert_to_numpy(model.queue.features)
    assert features.shape == (2, 64, model.queue.dim)
    # Each device's rows (4 per step, two text views, 6 steps) in its slice.
    assert int(keras.ops.convert_to_numpy(model.queue.pointer)) == 6 * 2 * 4
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, rtol=1e-5)

    command = _train_command(shape_shards, cut, *steps, "--stall-timeout", "20")
    processes = _launch(command, _jax_processes(2))
    first = cut / "checkpoints" / "ckpt-00000002.keras"
    while not first.exists():
        assert processes[0].poll() is None, processes[0].communicate()[1][-3000:]
        time.sleep(0.05)
    processes[1].kill()
    killed = time.monotonic()
    _, stderr = processes[0].communicate(timeout=300)
    waited = time.monotonic() - killed
    processes[1].communicate()
    assert processes[0].returncode == 1, stderr[-3000:]
    assert "no step finished in 20 s (--stall-timeout)" in stderr
    assert waited < 20 + 60, waited
    assert not (cut / "model.keras").exists()

    _side_by_side(_train_command(shape_shards, cut, *steps, "--resume"),
                  _jax_processes(2))  # fmt: skip
    resumed = keras.models.load_model(cut / "model.keras")
    for a, b in zip(model.variables, resumed.variables, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-6, err_msg=a.path)
    for a, b in zip(
        model.optimizer.variables, resumed.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-6, err_msg=a.path)


@pytest.mark.one_backend("tensorflow", reason="tf.distribute is TensorFlow's")
@pytest.mark.slow
def test_two_tf_workers_train_through_the_cli(tmp_path, shape_shards):
    """Two `declip-keras train` workers of one `TF_CONFIG` cluster on loopback
    (`MultiWorkerMirroredStrategy`, one CPU replica each) train one model:
    each says at start how the run is spread and which shards it reads, and
    only the first writes the run's files."""
    envs = _tf_workers(2)
    run = tmp_path / "run"
    steps = ["--steps", "2", "--checkpoint-every", "1"]
    stdouts = _side_by_side(_train_command(shape_shards, run, *steps), envs)
    for index, stdout in enumerate(stdouts):
        assert (
            "tf.distribute.MultiWorkerMirroredStrategy: 2 process(es), "
            "2 device(s); global batch 8, 4 per device; "
            f"process {index} reads 1 of 2 shards."
        ) in stdout
    _assert_only_the_first_wrote(run, stdouts, [1, 2])


@pytest.mark.one_backend("tensorflow", reason="tf.distribute is TensorFlow's")
@pytest.mark.slow
def test_two_tf_workers_match_one_device(tmp_path):
    """Contrastive and NN terms with keys gathered across two workers
    (`MultiWorkerMirroredStrategy`, one replica each), and the gradients of
    their sum, equal one device's for the same global batch. (SimSiam and
    MLM are per replica under tf.distribute, as released: off here.)"""
    path = tmp_path / "contrastive.keras"
    small_model(vocabulary_size=1000, ss_weight=0.0, mlm_weight=0.0).save(path)
    stdout = _side_by_side([sys.executable, str(TF_WORKER), str(path)], _tf_workers(2))
    report = json.loads(stdout[0].strip().splitlines()[-1])
    _assert_same(report, ("loss", "clip_loss", "nn_loss"))
