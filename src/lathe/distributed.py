"""Several processes: who we are (rank, world), which engine the run asks for (DDP, DeepSpeed
ZeRO, FSDP) and its checks, the process group on CPU machines, and `nproc_per_node`, where
Lathe starts torchrun itself.

The engines are the libraries' own (torch DDP, DeepSpeed, accelerate's FSDP, all reached
through the transformers Trainer); what is here is what they leave to the caller:
- refusing, in one line and before anything is written, an engine config that cannot run;
- on CPU processes, the process group (gloo) with `ddp_timeout`, made before
  TrainingArguments, which then use it (accelerate meets DeepSpeed only on an accelerator,
  and sets no timeout for CPU processes);
- a frozen helper model (a reference, a reward model) placed by the same engine as the policy;
- the launcher: torchrun's own, run in this process, whose failure becomes one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError, LatheError

PRESETS = Path(__file__).parent / "presets"
DEEPSPEED_PRESETS = {p.name.removesuffix("_config.json"): p for p in sorted((PRESETS / "deepspeed").glob("*.json"))}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by torchrun / accelerate launch / deepspeed (one process of a group)."""
    return "LOCAL_RANK" in os.environ


# --- DeepSpeed configs -----------------------------------------------------------------------

def deepspeed_path(value: Any) -> Any:
    """`deepspeed:` as TrainingArguments takes it: a preset name (ds_z3, ds_z3_offload ...) ->
    the shipped file; a path, checked; a dict, as is."""
    if isinstance(value, dict):
        return value
    name = str(value)
    short = Path(name).name.removesuffix(".json").removesuffix("_config")
    if not Path(name).expanduser().exists() and name == short and short in DEEPSPEED_PRESETS:
        return str(DEEPSPEED_PRESETS[short])
    return str(Path(name).expanduser())


def read_deepspeed(value: Any) -> dict[str, Any]:
    """The DeepSpeed config, parsed and checked, or one line naming what is wrong."""
    where = deepspeed_path(value)
    if isinstance(where, dict):
        ds = where
    else:
        path = Path(where)
        presets = ", ".join(DEEPSPEED_PRESETS)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"deepspeed: {value} {what}; give a DeepSpeed JSON config file, or a preset "
                              f"name ({presets})")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"deepspeed: {value} is not a text file; give a DeepSpeed JSON config") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed: {value} is not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg}); fix the file, or start from a preset ({presets})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {value} holds a JSON {type(ds).__name__}, not an object of DeepSpeed "
                          "settings; see examples/deepspeed/ds_z3_config.json")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {value} has zero_optimization.stage {stage!r}; it must be 0, 1, 2 or 3")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def engine_name(cfg: Any) -> str:
    """What the run summary calls the engine: DDP, DeepSpeed ZeRO-3 (offload), FSDP."""
    extra = cfg.train.extra
    if extra.get("deepspeed"):
        ds = read_deepspeed(extra["deepspeed"])
        zero = ds.get("zero_optimization", {})
        offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
                   if (zero.get(k) or {}).get("device", "none") != "none"]
        return f"DeepSpeed ZeRO-{zero_stage(ds)}" + (f" ({' + '.join(offload)} offloaded)" if offload else "")
    if _fsdp(extra):
        return "FSDP"
    return "DDP" if world_size() > 1 else ""


def _fsdp(extra: dict[str, Any]) -> bool:
    """FSDP asked for: the fsdp key, or an accelerate launch with an FSDP config."""
    return bool(extra.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_engine(cfg: Any) -> None:
    """The engine keys against each other and the run, from the config alone (no torch)."""
    import importlib.util

    extra, ft = cfg.train.extra, cfg.finetune
    fsdp = _fsdp(extra)
    if cfg.train.nproc_per_node < 1:
        raise ConfigError(f"nproc_per_node must be at least 1 (got {cfg.train.nproc_per_node})")
    if fsdp and not extra.get("deepspeed"):
        if ft.stage == "ppo":
            raise ConfigError("stage ppo does not run under FSDP (its rollouts and four models are Lathe's own "
                              "loop); remove fsdp: several processes then train it with DDP, or DeepSpeed "
                              "ZeRO (deepspeed=ds_z3)")
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("fsdp needs GPUs: accelerate runs FSDP on accelerators only, and on CPU processes "
                              "would silently fall back to plain DDP; on CPU use DDP (no engine key) or "
                              "DeepSpeed ZeRO (deepspeed=ds_z3)")
    if not extra.get("deepspeed"):
        return
    ds = read_deepspeed(extra["deepspeed"])
    if fsdp:
        raise ConfigError("deepspeed and fsdp are both set; choose one engine (remove fsdp, or deepspeed)")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("deepspeed is set, but the DeepSpeed package is not installed; "
                          "pip install 'lathe[deepspeed]' (or remove the deepspeed key)")
    stage = zero_stage(ds)
    if stage == 3 and cfg.model.quantization_bit:
        raise ConfigError(f"quantization_bit {cfg.model.quantization_bit} (QLoRA) cannot run under DeepSpeed "
                          "ZeRO-3 here; use a ZeRO-2 config (ds_z2) or DDP")
    if stage == 3 and ft.finetuning_type == "freeze":
        raise ConfigError("finetuning_type freeze cannot run under DeepSpeed ZeRO-3 (the frozen layers are "
                          "sharded with the trained ones); use ZeRO-2 (ds_z2), or lora")


# --- the process group on CPU machines ---------------------------------------------------------

def cpu_process_group(deepspeed: bool, timeout_s: int) -> dict[str, Any]:
    """TrainingArguments' keys for a run without CUDA, after making its process group here:
    gloo with `ddp_timeout` (a rank that stops answering ends the run after that long); DeepSpeed
    then runs on it (a single process too: a world of one)."""
    from datetime import timedelta

    from accelerate import PartialState

    if deepspeed and not launched():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    if not deepspeed and world_size() == 1:
        return {}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn that it found no GPU
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # a run before this one in this process (tune, cv, pipeline): its
        AcceleratorState._reset_state()  # engine state goes (as TrainingArguments does); the group stays
    with _quiet_stdout():  # DeepSpeed prints the name of each op it loads
        if deepspeed:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend="gloo", timeout=timedelta(seconds=timeout_s))
            finally:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=timeout_s))
    # use_cpu: accelerate wraps the model in DDP over gloo (without it each rank would train alone)
    return {"accelerator_config": {"use_configured_state": True}, **({} if deepspeed else {"use_cpu": True})}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quiet_stdout() -> Any:
    from lathe.quiet import debugging

    if debugging():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


# What the gloo / NCCL collectives raise when another process died or stopped answering.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out",
              "timed out", "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def peer_failure(e: BaseException) -> str | None:
    """One line for this process of a launched run when a collective failed because another
    process is gone or hung (the launcher names that process); None for anything else."""
    if not launched() or world_size() < 2:
        return None
    text = str(e)
    dist_error = any(c.__name__.startswith("Dist") and c.__module__.startswith("torch") for c in type(e).__mro__)
    if not (dist_error or (isinstance(e, RuntimeError) and any(s in text for s in _PEER_GONE))):
        return None
    reason = next((s for s in _PEER_GONE if s in text), type(e).__name__).lower()
    return (f"rank {rank()} stopped: another process of the run stopped answering ({reason}; a hung one is "
            f"given ddp_timeout seconds)")


# --- helper models -----------------------------------------------------------------------------

def prepare_frozen(trainer: Any, model: Any) -> Any:
    """A frozen helper model (dpo/kto's reference, a reward model) placed as the trainer's
    engine places the policy: under DeepSpeed an inference engine of its own (ZeRO-3 keeps it
    sharded, and gathers each layer as it runs); else moved to the run's device."""
    if not trainer.is_deepspeed_enabled:
        return model.to(trainer.args.device)
    from lathe.loop import frozen_engine

    return frozen_engine(model, trainer.accelerator.state.deepspeed_plugin.deepspeed_config)


# --- a loop of Lathe's own over several processes (ppo) ----------------------------------------

class Peers:
    """The processes of a run whose training loop is Lathe's own (ppo), not the Trainer's: this
    process's device, its process group (gloo on CPU, NCCL on GPU, with `ddp_timeout`), the
    model wrapped in torch DDP, and the few collectives the loop needs. With one process every
    method is the identity, so the loop reads the same either way."""

    def __init__(self, timeout_s: int) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        self.world, self.rank = world_size(), rank()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of `items` (rank order = `items` order). A list that
        does not divide evenly is first topped up by repeating its own items from the start
        (as torch's DistributedSampler does), so every process gets as many."""
        if self.world == 1:
            return list(items)
        items, given = list(items), list(items)
        while len(items) % self.world:
            items.append(given[(len(items) - len(given)) % len(given)])
        k = len(items) // self.world
        return items[self.rank * k:(self.rank + 1) * k]

    def sum(self, tensor: Any) -> Any:
        """The element-wise sum of `tensor` over the processes (a new tensor)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.detach().clone()
        dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: Any) -> Any:
        """Every process's `tensor` (same shape on each), concatenated along dim 0 in rank order."""
        if self.world == 1:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def wrap(self, model: Any) -> Any:
        """The model as the loop trains it: torch DDP (gradients averaged over the processes in
        backward), or the model itself in one process."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: Any, accumulating: bool) -> Any:
        """DDP's no_sync for an accumulation micro-step (the gradients are averaged once, at the
        micro-step before the optimizer step)."""
        if self.world == 1 or not accumulating:
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# --- starting the processes: nproc_per_node ---------------------------------------------------

def wanted_processes(cfg: Any) -> int:
    """Processes to start here: nproc_per_node, else what `accelerate launch` was asked for but
    could not start (its CPU launcher starts one process and relies on mpirun for more)."""
    if launched():
        return 1
    return max(cfg.train.nproc_per_node, _accelerate_cpu_processes())


def several_machines() -> bool:
    """NNODES > 1 (LLaMA-Factory's variable): this machine is one of several; the processes
    are started here even when it runs one."""
    return not launched() and int(os.environ.get("NNODES", "1")) > 1


def _accelerate_cpu_processes() -> int:
    """num_processes of the `accelerate launch` that started this process on CPU (one process)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true":
        return 1
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return 1
    values = dict(zip(argv, argv[1:]))
    for arg in argv:
        if "=" in arg and arg.startswith("--"):
            key, _, v = arg.partition("=")
            values[key] = v
    found = values.get("--num_processes")
    if found is None and values.get("--config_file"):
        import yaml

        try:
            found = (yaml.safe_load(Path(values["--config_file"]).read_text()) or {}).get("num_processes")
        except (OSError, yaml.YAMLError, AttributeError):
            found = None
    try:
        return max(1, int(found or 1))
    except ValueError:
        return 1


def check_devices(n: int) -> None:
    """nproc_per_node against what this machine has: GPUs, or CPU cores without them."""
    import torch

    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        have, what = os.cpu_count() or 1, "CPU core(s) and no GPU"
    if n > have:
        raise ConfigError(f"nproc_per_node={n} is more than this machine has ({have} {what}); "
                          f"set nproc_per_node to at most {have}")


def launch(n: int, config_path: str, command: str = "train") -> None:
    """`lathe COMMAND CONFIG` in n processes of this machine through torchrun (run here, in this
    process). Several machines: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (LLaMA-Factory's
    variables). A process that fails stops the others; it becomes one line (LauncherError)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    env = os.environ
    nnodes = int(env.get("NNODES", "1"))
    argv = ["--nproc_per_node", str(n), "--nnodes", str(nnodes)]
    if nnodes > 1:
        argv += ["--node_rank", env.get("NODE_RANK", "0"), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"]
    else:
        argv += ["--standalone"]
    argv += ["-m", "lathe", command, config_path]
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate launch's CPU flag: the processes set up their own group
    if "OMP_NUM_THREADS" not in env:  # what torchrun would set, without its banner saying so
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        raise _failure(e) from None
    except RendezvousError as e:
        where = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"
        raise LauncherError(f"the {nnodes} machines did not meet at {where} ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]}); start the same command on every machine "
                            "with the same NNODES, MASTER_ADDR and MASTER_PORT, and a NODE_RANK of its own") from None


class LauncherError(LatheError):
    """A process of a launched run failed (its own error, if any, is above); `code`: the exit
    code to end with (2 when that process stopped on a user's mistake, else 1)."""

    kind = "LaunchError"

    def __init__(self, line: str, code: int = 1) -> None:
        super().__init__(line)
        self.code = code


def _failure(e: Any) -> LauncherError:
    """The process whose failure stopped the run, in one line: the earliest. torch records a
    failure's time in whole seconds, so a killed process and the peer whose collective failed
    because of it often tie (and its own choice then names the lowest rank, the peer): among the
    earliest, a process killed by a signal is the cause, and one killed by another signal before
    one that got the launcher's SIGTERM. One killed later was killed by the
    launcher itself, stopping the run after the first failure (a hung process does not answer
    its SIGTERM, and gets SIGKILL after a grace period)."""
    import signal

    failures = e.failures
    first_time = min(f.timestamp for f in failures.values())
    earliest = {r: f for r, f in failures.items() if f.timestamp <= first_time}
    signalled = {r: f for r, f in earliest.items() if f.exitcode < 0}
    # SIGTERM is what the launcher sends the others once one has failed: in the same second as a
    # process killed by another signal, that other one is the cause
    pool = {r: f for r, f in signalled.items() if f.exitcode != -signal.SIGTERM} or signalled or earliest
    rank_ = min(pool)
    first = pool[rank_]
    if first.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-first.exitcode}"
    else:
        how = f"exited with code {first.exitcode}"
    line = (f"rank {rank_} (pid {first.pid}) {how}, so the run was stopped on every process; "
            "its own error, if it printed one, is above (a run with checkpoints continues with "
            "resume_from_checkpoint=true)")
    return LauncherError(line, code=2 if first.exitcode == 2 else 1)


def leave_process_group() -> None:
    """At the end of a launched process: the process group closed before the interpreter exits;
    nothing when no group was made."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End this process with `code`: the group left, Python's exit handlers run and its streams
    flushed, then the process ends without running C++ destructors. A launched process that
    exits normally can abort in them ("terminate called without an active exception": a
    communication thread of torch's destroyed while still running), which turned a finished run
    into a failed one under load, twice in CI runs, after the process group had been destroyed."""
    import atexit

    leave_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
