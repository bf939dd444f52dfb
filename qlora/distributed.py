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
