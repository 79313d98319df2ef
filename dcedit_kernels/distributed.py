"""Data-parallel editor training: what `train.train_editor` does with
`TrainConfig(data_parallel=True)` in a torch.distributed process group of W > 1 processes
(torchrun; NCCL on GPUs, gloo on CPU).  `dcedit train` under torchrun sets it.

Each process holds a replica of the model and its ModelEditor, starts from rank 0's editors, runs
its own training batches (global batch b·W + rank, so W processes see W different batches per
step) and, before every optimiser step:
- averages the editors' gradients over the processes (`average_gradients`, one all-reduce per
  parameter): the gradient of one process with W·accumulate batches;
- merges the editors' running norms (the factors', and MoEditor's gate features'; `merge_running_norms`,
  one all-reduce per norm of its sums and sums of squares in fp64): every process ends the step
  with the statistics of all the step's tokens (and edits).
Without running norms a step is the step of one process with W·accumulate batches, to rounding, for
editors that draw no random numbers in training (MEND, ProEditor): each process draws its own gate
noise (MoEditor) and random groups (RaEditor), from generators seeded per rank.
With them (MEND's default) it differs a little: one process normalises a step's later batches
with the statistics of its earlier ones, each of the W processes with its own batches' only.
No collective runs inside a batch, so a process that reruns a batch (the fp16 retry) never waits
for the others.  Each process scores a share of the validation batches and all get the gathered
scores (`gather_outcomes`).  Rank 0 writes the checkpoints (with every process's RNG states: a
resume draws what the uninterrupted run would).  Every process must reach the same checkpoint_dir
to resume; a resume with another W is refused.

A failure (an Exception) in a step's work raises on every process, rather than leaving the others
waiting in their next collective: a process whose batches raise still joins the step's all-reduce,
which counts the failures (`average_gradients`); the optimiser step is followed by a one-flag
all-reduce (`settle`), as is restoring a resume's RNG states; the validation shares and the RNG
states a checkpoint holds are gathered with their outcome (`gather_outcomes`); rank 0 sends the
outcome of its checkpoint writes (`on_rank0`).  The failed process re-raises its own error; the
others raise a `PeerFailure` (a RuntimeError) naming its rank and error.  Not covered: the few
statements between these (setting .grad to None, the norms' sums, a best state's copy), a
KeyboardInterrupt, and a process killed outright (torchrun stops the others).  Before the first step
the processes check that they were given the same settings (`agree_on_start`): different ones would
call different collectives; and the same model (a digest of the edited layers' weights,
`weights_digest`): another one would train the shared editors on its own gradients.  All of them
must be given data_parallel=True: a process without it trains on its own and calls no collective, so
the others wait for it in agree_on_start until it ends (a check would need a collective in every
process group, also where the processes train different editors on their own).  data_parallel=True
in processes that torchrun started (WORLD_SIZE > 1) but that joined no process group is refused
(`train_editor`): each would train on its own.  data_parallel=True in a plain process (no process
group, WORLD_SIZE unset: the script was not started by torchrun) trains in that one process and
warns, so that a user who forgot torchrun does not take the run for one over several GPUs.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Raised on the processes of a data-parallel run that did not fail themselves, naming the
    rank(s) that did and their errors (those raise their own): `dcedit train` prints it as one
    line, where a healthy process printed a traceback of the collective it was told in."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_size() -> int:
    """The number of processes a launcher started (torchrun's WORLD_SIZE; 1 without one), whether or
    not they have joined a process group yet."""
    return _env_int("WORLD_SIZE", "1")


def one_of_several() -> bool:
    """Whether this process is one of several: a launcher started more than one (WORLD_SIZE > 1,
    joined or not yet) or its caller set up a process group of several (`mp.spawn` and
    `init_process_group(init_method="tcp://...")`, no WORLD_SIZE).  A WORLD_SIZE that is not an
    int counts as several: what reads it for training refuses it, and a caller asking this
    (the CLI, before it takes SIGTERM over) must not guess one process where there may be many.
    An empty one is taken as unset (a shell's `WORLD_SIZE=` is no launcher's)."""
    try:
        if os.environ.get("WORLD_SIZE", "").strip() and launched_size() > 1:
            return True
    except ValueError:
        return True
    return world()[1] > 1


def unlaunched() -> bool:
    """Whether this process runs on its own by construction: no process group is initialised and no
    launcher started it (WORLD_SIZE unset; torchrun sets it, also to 1)."""
    return not (dist.is_available() and dist.is_initialized()) and "WORLD_SIZE" not in os.environ


def init_from_env(device: str) -> tuple[str, bool]:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group (NCCL for a CUDA
    `device`, else gloo): (this process's device, "cuda" becoming cuda:LOCAL_RANK; True, so that the
    caller destroys the group when done).  Without torchrun, or with the group already up,
    (`device`, False).  ValueError for a WORLD_SIZE or LOCAL_RANK that is not an int, or RANK,
    MASTER_ADDR or MASTER_PORT missing beside WORLD_SIZE > 1 (torchrun sets them all), a CUDA
    `device` without a visible GPU of index LOCAL_RANK, or one naming another index ("cuda:1" in
    the process of LOCAL_RANK=0: each process takes its own GPU)."""
    size = launched_size()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return device, False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # init_process_group's env:// rendezvous would raise for the first only, or wait
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: run under torchrun, which sets them")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = _env_int("LOCAL_RANK", "0")
        index = torch.device(device).index
        if index is not None and index != local:
            # It was replaced by cuda:LOCAL_RANK without a word: every process asked for one GPU, and
            # NCCL takes one GPU per process.
            raise ValueError(f"device {device!r}: under torchrun each process takes the GPU of its LOCAL_RANK "
                             f"(this one, LOCAL_RANK={local}, cuda:{local}): give device 'cuda', and choose the "
                             "GPUs with CUDA_VISIBLE_DEVICES")
        # Checked here, before the group is joined: torch.cuda.set_device raised an AttributeError
        # ("no attribute '_cuda_setDevice'") on a CPU torch and "invalid device ordinal" with fewer
        # GPUs than processes, a traceback in every process where one process's --device check
        # says it in one line (a user trial of `dcedit train --device cuda` under torchrun).
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not 0 <= local < visible:
            raise ValueError(f"device {device!r}: the process of LOCAL_RANK={local} needs CUDA device {local}, "
                             f"but {visible} visible (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda or 'not built'}): start at most one process per GPU, "
                             "or train on the CPU over gloo (device 'cpu')")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # Imported before the group exists: torch.distributed.nn.functional's collectives take
    # group=group.WORLD as a default argument, evaluated on import, so its first import inside a
    # group (transformers' modeling_utils, when the model loads) held that group for good.
    # destroy_process_group() then left gloo's worker threads running, and one that freed a
    # finished all-reduce while the interpreter exited aborted the process ("terminate called
    # without an active exception", SIGABRT: 1 in 250 two-process runs of `dcedit train`; its
    # core dump showed the thread waiting for the GIL of the finalizing interpreter).
    import torch.distributed.nn as _before_the_group  # noqa: F401 (an import only; "import torch.…" would make torch local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device, True


def _env_int(name: str, default: str) -> int:
    """The environment variable `name` as an int (ValueError naming it otherwise)."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def _device(tensors) -> torch.device:
    """Where collectives run: NCCL takes CUDA tensors only, gloo any."""
    for t in tensors:
        return t.device
    return torch.device("cpu")


def broadcast_state(module: torch.nn.Module) -> None:
    """Every parameter and buffer of `module` set to rank 0's (identical replicas to start from)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(params: list, numbers: list[float], error: BaseException | None = None) -> list[float]:
    """Each param's .grad summed over the processes and divided by their number (a process without
    one adds zeros; a param that no process has a grad for keeps None, which the optimisers skip,
    as in one process); `numbers` (the step's batch counts and logged loss sums: every process
    passes as many) summed over the processes in the same all-reduce, and returned.

    `error`: what this process's step raised, if it did (it still calls this, so that nobody waits):
    the same all-reduce counts the failures, and if any process failed every process raises
    (`raise_failures`) before the gradients are reduced."""
    # One all-reduce per parameter, unbucketed: an editor has few (MEND 11, MoEditor with N_g = 8
    # 13, ProEditor 15, counted on the tiny Llama; the N_g editors are stacked in one tensor each),
    # so a flattened bucket would save about a dozen small calls per editor and step.
    _, size = world()
    head = torch.tensor([error is not None, *numbers, *(p.grad is not None for p in params)],
                        dtype=torch.float64, device=_device(params))
    _after(error, lambda: dist.all_reduce(head))
    if head[0] > 0:
        raise_failures(error, "in the same training step")
    for p, anyone in zip(params, head[1 + len(numbers):].tolist()):
        if anyone:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad.div_(size)
    return head[1:1 + len(numbers)].tolist()


def norm_sums(norm) -> list[torch.Tensor]:
    """A RunningNorm's (or FeatureNorm's) statistics as sums (token count; per side, Σx and Σx²),
    in fp64: new tensors, which the norm's later updates leave as they are (train_editor takes them
    at a step's start; `.double()` of a float64 editor's count is the buffer itself)."""
    k = norm.k.to(torch.float64, copy=True)
    out = [k.reshape(1)]
    for mean_name, s_name, _ in norm.STATS:
        mean, s = getattr(norm, mean_name).double(), getattr(norm, s_name).double()
        out += [k * mean, s + k * mean.square()]
    return out


def merge_running_norms(norms: list, before: list[list[torch.Tensor]]) -> None:
    """Every process's norms set to the statistics of all processes' tokens.

    `before` (`norm_sums` of each norm at the step's start, equal on every process): each process
    added its own batches to it, so the merged sums are Σ_r sums_r − (W − 1)·before; the mean is
    Σx / k and the sum of squared deviations Σx² − k·mean² (fp64, then stored in the buffers'
    dtype)."""
    _, size = world()
    for norm, start in zip(norms, before):
        now = norm_sums(norm)
        flat = torch.cat(now)
        dist.all_reduce(flat)
        flat -= (size - 1) * torch.cat(start).to(flat.device)
        k = flat[0]
        parts = flat[1:].split([t.numel() for t in now[1:]])
        with torch.no_grad():
            norm.k.fill_(float(k))
            for i, (mean_name, s_name, std_name) in enumerate(norm.STATS):
                total, squares = parts[2 * i], parts[2 * i + 1]
                mean = total / k if k > 0 else torch.zeros_like(total)
                s = (squares - k * mean.square()).clamp(min=0)
                getattr(norm, mean_name).copy_(mean)
                getattr(norm, s_name).copy_(s)
                if k >= 2:
                    getattr(norm, std_name).copy_((s / (k - 1)).sqrt())


def all_gather_object(obj) -> list:
    """Every process's `obj` (picklable), in rank order."""
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def _message(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _after(error: BaseException | None, collective):
    """`collective()`, run by a process that may hold its own `error`: if the collective fails too
    (a third process died), its error is raised from `error`, so that the first failure is not lost."""
    try:
        return collective()
    except Exception as exc:
        if error is None:
            raise
        raise exc from error


def _raise_if_any_failed(error: BaseException | None, messages: list, what: str) -> None:
    """After every process has shared its outcome (`messages`: each rank's `_message`): a failed
    process re-raises its own `error`, the others a RuntimeError naming each failed rank and its error."""
    if error is not None:
        raise error
    failed = [f"rank {r}: {message}" for r, message in enumerate(messages) if message]
    if failed:
        raise PeerFailure(f"another process failed {what} ({'; '.join(failed)})")


def raise_failures(error: BaseException | None, what: str) -> None:
    """Called by every process once they know that one of them failed (one all_gather of the
    messages, on this path only)."""
    _raise_if_any_failed(error, _after(error, lambda: all_gather_object(_message(error))), what)


def settle(error: BaseException | None, what: str, device: torch.device) -> None:
    """Every process says whether it failed (`error`: what it raised since the last collective; one
    all-reduce of a flag on `device`, where the step's tensors are: NCCL takes CUDA tensors only); if
    any did, every process raises (`raise_failures`)."""
    flag = torch.tensor([float(error is not None)], dtype=torch.float64, device=device)
    _after(error, lambda: dist.all_reduce(flag))
    if flag.item() > 0:
        raise_failures(error, what)


def gather_outcomes(fn, what: str) -> list:
    """`fn()` on every process, every process's result in rank order (the validation's shares of
    batches, the RNG states a checkpoint holds), or the failure of any process raised on every process."""
    error = value = None
    try:
        value = _sendable(fn())
    except Exception as exc:  # noqa: BLE001 -- re-raised below, after the others hear of it
        error = exc
    outcomes = _after(error, lambda: all_gather_object((_message(error), value)))
    _raise_if_any_failed(error, [message for message, _ in outcomes], what)
    return [v for _, v in outcomes]


def agree_on_start(error: BaseException | None, steps: int, plan: dict) -> None:
    """Raise on every process if one of them failed to set up (`error`), they would start from
    different steps (a checkpoint_dir that not every process sees), or their `plan`s differ (what
    sets the sequence of collectives: the TrainConfig, the requests, whether a process validates or
    checkpoints; under "resumed", the counters a resume read, which differ when the processes read
    different checkpoints of one step), rather than leave one waiting in a collective that another
    never calls."""
    outcomes = _after(error, lambda: all_gather_object((_message(error), steps, plan)))
    _raise_if_any_failed(error, [message for message, _, _ in outcomes], "to start training")
    starts = [s for _, s, _ in outcomes]
    if len(set(starts)) > 1:
        raise ValueError(f"the processes would start from different steps {starts}: a resume needs the same "
                         "checkpoint_dir on every process")
    mine = _flat(plan)
    differ = sorted({k for _, _, other in outcomes for k, v in _flat(other).items() ^ mine.items()})
    if any(k.startswith("resumed.") for k in differ):
        raise ValueError(f"the processes resumed from different checkpoints ({', '.join(differ)}) at step {starts[0]}: "
                         "a resume needs the same checkpoint_dir on every process")
    if "weights" in differ:  # the model, not a setting: its own message
        others = [k for k in differ if k != "weights"]
        raise ValueError("the processes' models differ: the edited layers' weights are not the same on every "
                         "process (each process of a data-parallel run needs a replica of one model, loaded "
                         "from the same checkpoint in the same dtype, with no edit applied)"
                         + (f"; their training settings differ too ({', '.join(others)})" if others else ""))
    if differ:
        raise ValueError(f"the processes were given different training settings ({', '.join(differ)}): every "
                         "process of a data-parallel run needs the same ModelEditor settings, TrainConfig, "
                         "requests and checkpoint_dir or none")


def weights_digest(modules: dict) -> str:
    """A SHA-256 of the named modules' own parameters (names, shapes, dtypes and bytes; a weight
    offloaded to "meta" by its name, shape and dtype only), for `agree_on_start`: the replicas of a
    data-parallel run must edit one model.  One loaded from another checkpoint, in another dtype or
    with an edit applied trained the shared editors on its own gradients without a word (its
    settings, requests and editor tensors were the others').  The edited layers' bytes only, not the
    whole model's: a few o×i weights to hash once per run (3 bf16 MLP weights of a 7B Llama,
    4096×11008, are 271 MB: 0.15 s of SHA-256 on this project's CPU machine, 1.8 GB/s)."""
    digest = hashlib.sha256()
    for name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            digest.update(f"{name}.{pname}:{tuple(param.shape)}:{param.dtype};".encode())
            if param.is_meta or not param.numel():
                continue
            try:
                data = param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            except (RuntimeError, TypeError):  # a tensor subclass without bytes to read: the same on every replica
                continue
            digest.update(memoryview(data))
    return digest.hexdigest()


def _flat(plan: dict, prefix: str = "") -> dict:
    """A nested dict's leaves by dotted key (the TrainConfig's fields named one by one)."""
    out = {}
    for key, value in plan.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if not isinstance(value, list) else tuple(value)
    return out


def on_rank0(fn, what: str):
    """`fn()` run by rank 0 only, its result on every process (rank 0's checkpoint writes).  The
    broadcast is also the others' wait for rank 0 to finish (a resume never reads a checkpoint
    being written).  If `fn` raises, rank 0 re-raises and the others raise a RuntimeError with its
    message, instead of waiting in their next collective."""
    rank, _ = world()
    error = value = None
    if rank == 0:
        try:
            value = _sendable(fn())
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the others hear of it
            error = exc
    message, value = _after(error, lambda: broadcast_object((_message(error), value)))
    if error is not None:
        raise error
    if message is not None:
        raise PeerFailure(f"rank 0 failed {what} ({message})")
    return value


def _sendable(value):
    """`value`, once pickled as torch's object collectives pickle it (PicklingError, TypeError, ...
    otherwise): checked inside the caller's try, so that a value that cannot be sent (a lambda, an
    open file) is a failure the others hear of.  Left to the collective, it failed there on its own
    process alone, before anything was sent, and the others waited in it until that process ended
    (then gloo's "Connection closed by peer", without its error).

    The collective pickles `value` a second time.  Left so, measured (1 thread, CPU): the values sent
    are small, and their pickling is a sliver of the work that made them: None from rank 0's
    checkpoint writes (on_rank0); the RNG states a checkpoint gathers, 5.5 KB, pickled in 40 µs; a
    validation share's scores, 0.8 ms for 10 batches of 25 edits (7.9 KB), which the tiny Llama took
    300 ms to score (0.3%; SmolLM2's batches take far longer), and 34 ms for 400 such batches
    (10,000 edits on one process, 310 KB).  Sending bytes pickled here would spare that once, for
    code of our own in place of torch's collective."""
    pickle.dumps(value)
    return value


def broadcast_object(obj, src: int = 0):
    """`obj` (picklable) from rank `src` on every process."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
