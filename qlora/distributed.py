"""Where this process stands under torchrun / accelerate launch (read from the environment, so no
torch import is needed to ask)."""
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 alone writes files, prints progress and evaluates."""
    return rank() == 0


def close_process_group() -> None:
    """Tear down the process group a finished distributed run set up. Left to interpreter exit, gloo's
    worker threads can outlive it and abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489) after the run itself succeeded. Called on success only: on an error another
    rank may still be inside a collective, and tearing down under it can hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
