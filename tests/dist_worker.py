"""One rank of a two-process CPU test run: `python tests/dist_worker.py BACKEND SCRIPT ARGS...`.

Launched by tests/distributed.py with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).
BACKEND is ddp or fsdp2:
  ddp    the script's own Accelerator(cpu=True) sees WORLD_SIZE=2 and runs DDP over gloo.
  fsdp2  accelerate only starts FSDP on GPUs. To run its FSDP2 code path on CPU this worker
         turns configs/accelerate/fsdp2.yaml into the environment `accelerate launch` would
         set, builds the FSDP plugin from it, and marks the (shared, process-wide) accelerator
         state as FSDP before the script builds its own Accelerator, which then reuses it.
Then it runs SCRIPT's main() through common.cli, as `python SCRIPT ARGS...` would.
"""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fsdp2_environment(config: Path) -> dict:
    """What `accelerate launch --config_file CONFIG` puts in each process's environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes",
                                               os.environ["WORLD_SIZE"], "script.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))} | {
        "ACCELERATE_MIXED_PRECISION": os.environ.get("TOFU_UNLEARN_MIXED_PRECISION", "no")}  # fp32 on CPU, unless
    # the GPU path's bf16 is emulated (harness.models.mixed_precision)


def main():
    backend, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    torch.set_num_threads(1)
    if backend == "fsdp2":
        os.environ.update(fsdp2_environment(REPO / "configs" / "accelerate" / "fsdp2.yaml"))
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        Accelerator(cpu=True)
        for state in (PartialState._shared_state, AcceleratorState._shared_state):
            state["distributed_type"] = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin()
        if os.environ["ACCELERATE_MIXED_PRECISION"] != "no":  # as AcceleratorState does for an FSDP launch
            plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    elif backend != "ddp":
        raise SystemExit(f"unknown backend {backend}")
    sys.path.insert(0, str(REPO))
    sys.argv = [script, *argv]
    runpy.run_path(str(REPO / script), run_name="__main__")


if __name__ == "__main__":
    main()
