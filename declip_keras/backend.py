"""The only place with backend-specific code; one function per need."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import keras


def sync_model_state(model: keras.Model) -> None:
    """Makes `model.weights` current inside `fit` (before saving, say).

    The JAX trainer keeps the training state outside the Keras variables
    between steps and writes it back only when asked.
    """
    if keras.backend.backend() == "jax":
        model.jax_state_sync()


@contextlib.contextmanager
def whole_state(model: keras.Model) -> Iterator[None]:
    """Inside, every variable of `model` and of its optimizer holds a whole,
    process-local value, to check or save it; `sync_model_state` first.

    With several JAX processes a variable lives on every host's devices: the
    neighbour queues are split over them (one slice per device) and are
    gathered from every host, a collective, so every process must enter at
    the same point of the run. The replicated weights are copied to this
    process too, and the distribution is lifted: an op on a value spread over
    the hosts is a program every process must run, and only one saves.
    Elsewhere every value is local already.
    """
    sync_model_state(model)
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    if jax.process_count() == 1:
        yield
        return
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from declip_keras.compat import values_replaced

    optimizer = getattr(model, "optimizer", None)
    variables = [*model.variables, *(optimizer.variables if optimizer else [])]
    local = [
        jnp.asarray(
            np.asarray(v.value)
            if v.value.is_fully_replicated
            else multihost_utils.process_allgather(v.value, tiled=True)
        )
        for v in variables
    ]
    # Saving also builds variables (a fresh optimizer, to list what not to
    # save); under the run's distribution each would be laid out over every
    # host, a collective this process alone would enter.
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        with values_replaced(variables, local):
            yield
    finally:
        keras.distribution.set_distribution(distribution)


def dense_gradients(gradients: list) -> list:
    """Sums TensorFlow's sparse gradients into dense ones; other backends' as given.

    TensorFlow's gradient of a gather (the token embedding) is
    `IndexedSlices`, one slice per looked-up id, repeats included. Keras 3's
    Adam applies such a gradient slice by slice, so a token seen k times in
    the batch gets k moment updates of its partial gradients instead of one of
    their sum, and its row moves further than JAX's or torch's (checked: one
    token repeated 3 times moved 1.7x as far after three Adam steps). Summed
    first, the update is the dense one every backend computes.
    """
    if keras.backend.backend() != "tensorflow":
        return gradients
    import tensorflow as tf

    return [
        tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for g in gradients
    ]


def keras_adamw() -> type:
    """Keras' AdamW as this backend runs it, to subclass.

    Under torch, Keras swaps in its multi-tensor AdamW (`torch._foreach`
    updates) for `keras.optimizers.AdamW` itself but not for a subclass,
    which would update variable by variable: 1.16x the CLIP step's time at
    the benchmark's shapes on a 2-core CPU (987 ms against 854).
    """
    if keras.backend.backend() == "torch":
        from declip_keras.compat import torch_fused_adamw

        return torch_fused_adamw()
    return keras.optimizers.AdamW


@dataclasses.dataclass(frozen=True)
class Replicas:
    """How a run is spread: devices in all, and this host among the hosts."""

    devices: int = 1
    host_index: int = 0
    host_count: int = 1
    strategy: Any = None  # a tf.distribute strategy, under TensorFlow
    # With several processes only the first writes the run's files.
    writes_files: bool = True
    # Whether one step function sees every device's rows (JAX).
    global_view: bool = False
    # What spreads the run, for the start-up line.
    engine: str = "one device"
    # Whether the writing process can run the model on its own (to evaluate):
    # not where the weights live on every host's devices (JAX, several hosts).
    writer_computes_alone: bool = True

    def scope(self) -> contextlib.AbstractContextManager:
        """Where models and optimizers must be built (TensorFlow strategies)."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    @property
    def batch_splits(self) -> int:
        """Slices a host's batch is cut into before a step sees one: its
        replicas under `tf.distribute`; 1 where a step sees the whole batch
        (JAX's global view, a torch process)."""
        return self.devices // self.host_count if self.strategy else 1

    @property
    def queue_replicas(self) -> int:
        """Neighbour queues one model holds (`DeCLIP(queue_replicas=...)`):
        one per device where a step sees them all, else the replica's own."""
        return self.devices if self.global_view else 1


def configure_distribution() -> Replicas:
    """Spreads training over every device the backend sees.

    JAX: `keras.distribution.DataParallel` over all devices; the jitted step
    sees the global batch, so contrastive and neighbour losses use global
    negatives with no explicit gather (XLA adds the collectives). With
    `JAX_COORDINATOR_ADDRESS` set (or on a TPU pod), `jax.distributed` joins
    the hosts first and each host reads its share of the shards.
    TensorFlow: `MultiWorkerMirroredStrategy` when `TF_CONFIG` describes a
    cluster, `MirroredStrategy` over two or more GPUs; each replica's step
    sees its slice of the batch and `gather_replicas` supplies global keys.
    torch: one process on one device, or under `torchrun` one process per
    device (`torch.distributed` over NCCL on GPUs, gloo on CPUs), each reading
    its share of the shards; `gather_replicas` supplies global keys and
    `share_across_processes` keeps the processes' models identical.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_distribution()
    if backend == "torch":
        return _torch_distribution()
    return _jax_distribution()


def _jax_distribution() -> Replicas:
    import jax

    if "JAX_COORDINATOR_ADDRESS" in os.environ and not jax.distributed.is_initialized():
        _join_jax_processes()
    devices = jax.devices()
    if len(devices) > 1:
        # Each host reads its own shards (`PipelineOptions.host_index`), so
        # Keras must not shard the host's stream again.
        keras.distribution.set_distribution(
            _DataParallelWithQueues(devices=devices, auto_shard_dataset=False)
        )
    host = jax.process_index()
    hosts = jax.process_count()
    engine = "keras.distribution.DataParallel" if len(devices) > 1 else "one device"
    return Replicas(
        len(devices),
        host,
        hosts,
        writes_files=host == 0,
        global_view=True,
        engine=f"jax.distributed, {engine}" if hosts > 1 else engine,
        writer_computes_alone=hosts == 1,
    )


def _join_jax_processes() -> None:
    """`jax.distributed.initialize` from `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which JAX itself reads only
    on the clusters it detects (Slurm, Cloud TPU, MPI)."""
    import jax

    environ = os.environ
    missing = [n for n in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if n not in environ]
    if missing:
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: "
            "every process needs the process count and its own index."
        )
    try:
        count, index = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
            f"{environ['JAX_NUM_PROCESSES']!r} and {environ['JAX_PROCESS_ID']!r}."
        ) from None
    if not 0 <= index < count:
        raise ValueError(f"JAX_PROCESS_ID={index} is not in 0..{count - 1}.")
    # JAX's CPU client has no cross-process collectives unless told which;
    # GPU and TPU clients ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=count,
        process_id=index,
    )


class _DataParallelWithQueues(keras.distribution.DataParallel):
    """Data parallelism whose neighbour queues live with their replicas.

    Every weight is replicated, as under `DataParallel`, except stacked
    per-device queues `[devices, Q, D]` (`DeCLIP(queue_replicas=devices)`):
    slice r sits on device r, beside the batch rows that search and fill it,
    so XLA keeps the search local and no device holds the others' queues. A
    single queue (a model built for one device) stays replicated.
    """

    def get_variable_layout(self, variable):
        devices = self.device_mesh.shape[0]
        if variable.path.endswith("nn_queue/features") and (
            variable.shape[0] == devices
        ):
            axes = [self.batch_dim_name] + [None] * (len(variable.shape) - 1)
            return keras.distribution.TensorLayout(axes, self.device_mesh)
        return super().get_variable_layout(variable)


def _tf_distribution() -> Replicas:
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        tasks = resolver.cluster_spec().as_dict()
        # The chief (if any) is host 0 and the workers follow it.
        chiefs = len(tasks.get("chief", []))
        host = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        hosts = chiefs + len(tasks.get("worker", []))
        return Replicas(
            strategy.num_replicas_in_sync,
            host,
            hosts,
            strategy,
            writes_files=host == 0,
            engine="tf.distribute.MultiWorkerMirroredStrategy",
        )
    if len(tf.config.list_logical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return Replicas(
            strategy.num_replicas_in_sync,
            strategy=strategy,
            engine="tf.distribute.MirroredStrategy",
        )
    return Replicas()


def _torch_distribution() -> Replicas:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Replicas()
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        # Before any tensor exists: Keras puts its tensors on the current device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    return Replicas(
        world, rank, world, writes_files=rank == 0, engine="torchrun, torch.distributed"
    )


def _torch_processes():
    """`torch.distributed` when torchrun runs several processes, else None."""
    if keras.backend.backend() != "torch":
        return None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


def share_across_processes(model: keras.Model) -> None:
    """Under torchrun, makes the processes train one model.

    Every variable starts as process 0's, and each trainable variable's
    gradient is averaged over the processes as backward produces it (a hook
    per variable, one all-reduce each), so every process applies the global
    batch's gradient. Keras' torch trainer owns the step, so this replaces
    DDP's module wrapper; it gives up DDP's bucketing of the all-reduces.
    Elsewhere it does nothing.
    """
    dist = _torch_processes()
    if dist is None:
        return
    import torch

    world = dist.get_world_size()

    def average(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    with torch.no_grad():
        for variable in model.variables:
            dist.broadcast(variable.value.data, src=0)
    for variable in model.trainable_variables:
        variable.value.register_hook(average)


def global_value(x):
    """`x` with the value of its mean over torchrun's processes and the
    gradient of the local `x`: logged losses then agree on every process
    (and with one process), while the gradients stay local until
    `share_across_processes` averages them. Elsewhere `x` itself."""
    dist = _torch_processes()
    if dist is None:
        return x
    local = x.detach()
    mean = local.clone()
    dist.all_reduce(mean)
    return x + (mean / dist.get_world_size() - local)


def _tf_replica_context():
    """TensorFlow's replica context when a step runs split over replicas."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gather_replicas(x):
    """`[b, ...]` of every replica concatenated to `[N, ...]`, with gradient.

    Under `tf.distribute` and torchrun each replica's step sees its own slice
    of the batch, so contrastive keys must be gathered (the gather's gradient
    sums the upstream gradients and hands each replica its slice). A JAX
    data-parallel step already sees the global batch, as does one process:
    `x` as is.
    """
    dist = _torch_processes()
    if dist is not None:
        import torch
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    context = _tf_replica_context()
    return x if context is None else context.all_gather(x, axis=0)


def replica_offset(local_batch):
    """Index of this replica's first row in `gather_replicas`' output."""
    dist = _torch_processes()
    if dist is not None:
        return dist.get_rank() * local_batch
    context = _tf_replica_context()
    if context is None:
        return 0
    return context.replica_id_in_sync_group * local_batch


def scale_loss_for_replicas(loss):
    """Divides by the replica count where the trainer sums replicas' gradients.

    Keras' TensorFlow trainer sums gradients over replicas and multiplies the
    logged loss back; its own losses pre-divide, so a `compute_loss` override
    must too.
    """
    context = _tf_replica_context()
    return loss if context is None else loss / context.num_replicas_in_sync


def synchronized_batch_norm() -> bool:
    """Whether a tower's batch norm can average its statistics over replicas.

    Keras offers it on TensorFlow only (`BatchNormalization(synchronized=True)`,
    which raises elsewhere). JAX's data-parallel step sees the global batch,
    so its statistics are global already; under torchrun each process
    normalises its own slice.
    """
    return keras.backend.backend() == "tensorflow"


def can_remat_blocks() -> bool:
    """Whether Keras can recompute keras-hub's transformer blocks in training.

    JAX (`jax.checkpoint`) and torch (`torch.utils.checkpoint`) can; Keras'
    TensorFlow remat (`tf.recompute_grad`) rejects keyword arguments inside a
    compiled step, and the blocks take `training=`.
    """
    return keras.backend.backend() in ("jax", "torch")


def map_in_turn(fn, xs):
    """`fn` applied to `xs[0]`, `xs[1]`, ... one after another, stacked.

    `ops.map` (a scan under JAX) orders the calls, so XLA cannot schedule all
    their rematerialisations at once. TensorFlow's `tf.recompute_grad` fails
    inside the while loop `ops.map` builds there, so it gets a Python loop.
    """
    if keras.backend.backend() == "tensorflow":
        outputs = [fn(x) for x in keras.ops.unstack(xs)]
        return keras.tree.map_structure(lambda *y: keras.ops.stack(y), *outputs)
    return keras.ops.map(fn, xs)


def can_export_saved_model() -> bool:
    """JAX (through jax2tf) and TensorFlow write SavedModels; torch cannot."""
    return keras.backend.backend() in ("jax", "tensorflow")


def loss_term_gradient_norms(
    model: keras.Model, batch: dict, groups: dict[str, list]
) -> dict[str, dict[str, float]]:
    """The norm of each weighted loss term's gradient over groups of variables.

    A diagnostic, not a training step: the model runs in training mode on
    `batch`, the terms come from `model.compute_loss_terms(training=False)`
    (the neighbour queue is read, never written), and no variable changes
    other than batch-norm moving statistics, which no loss reads.

    Args:
        model: a built `DeCLIP`.
        batch: one training batch (a dict of arrays).
        groups: named lists of trainable variables, e.g. the two towers'.

    Returns:
        `{term: {group: norm}}` for every active term, each term multiplied by
        its loss weight (so the norms add up the way the total's gradient does).
    """
    weights = model.term_weights
    names = [term.name for term in model.active_terms]
    variables = [v for group in groups.values() for v in group]
    sizes = [len(group) for group in groups.values()]
    backend = keras.backend.backend()

    def weighted_terms():
        outputs = model(batch, training=True)
        terms = model.compute_loss_terms(batch, outputs, training=False)
        return [weights[name] * terms[name] for name in names]

    if backend == "jax":
        import jax

        others = [v for v in model.variables if all(v is not w for w in variables)]

        def term(values, index):
            mapping = list(zip(variables, values, strict=True))
            mapping += [(v, v.value) for v in others]
            with keras.StatelessScope(state_mapping=mapping):
                return weighted_terms()[index]

        values = [v.value for v in variables]
        grads = [jax.grad(term)(values, i) for i in range(len(names))]
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape(persistent=True) as tape:
            terms = weighted_terms()
        grads = [tape.gradient(t, [v.value for v in variables]) for t in terms]
    else:
        import torch

        terms = weighted_terms()
        grads = [
            torch.autograd.grad(
                t, [v.value for v in variables], retain_graph=True, allow_unused=True
            )
            for t in terms
        ]
    result = {}
    for name, term_grads in zip(names, grads, strict=True):
        squares = [
            0.0
            if g is None
            else float(keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.square(g))))
            for g in term_grads
        ]
        result[name] = {}
        start = 0
        for group, size in zip(groups, sizes, strict=True):
            result[name][group] = sum(squares[start : start + size]) ** 0.5
            start += size
    return result


def accelerator() -> tuple[str, str]:
    """(kind, name) of the device the backend computes on: `("cpu", ...)`,
    `("gpu", "NVIDIA H200")` or `("tpu", "TPU v5 lite")`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.platform, getattr(device, "device_kind", device.platform)
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "gpu", torch.cuda.get_device_name(0)
        return "cpu", "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return "gpu", details.get("device_name", "GPU")
    return "cpu", "cpu"


@contextlib.contextmanager
def profiling(directory: str):
    """Records the backend's per-op trace of what runs inside, into
    `directory`: TensorBoard's profile plugin reads JAX's and TensorFlow's
    (`tensorboard --logdir DIRECTORY`), Chrome's `chrome://tracing` or
    Perfetto torch's `trace.json`. Yields a function that returns a text
    table of the ops by self time (torch) or None (read the trace)."""
    backend = keras.backend.backend()
    os.makedirs(directory, exist_ok=True)
    if backend == "jax":
        import jax

        with jax.profiler.trace(directory):
            yield lambda: None
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.profiler.experimental.start(directory)
        try:
            yield lambda: None
        finally:
            tf.profiler.experimental.stop()
    else:
        import torch

        with torch.profiler.profile() as profile:
            yield lambda: profile.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=15
            )
        profile.export_chrome_trace(os.path.join(directory, "trace.json"))


def peak_memory_bytes() -> int:
    """Peak memory in use so far: the accelerator's, or on a CPU the process's
    resident set."""
    backend = keras.backend.backend()
    kind, _ = accelerator()
    if kind != "cpu":
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return int(stats.get("peak_bytes_in_use", 0))
        if backend == "torch":
            import torch

            return int(torch.cuda.max_memory_allocated())
        import tensorflow as tf

        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
