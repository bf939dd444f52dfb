"""The output folder of merge, export, generate and eval: named, and never silently overwritten."""
from pathlib import Path
from typing import Optional

from qlora.config import QLoraConfig
from qlora.errors import UserError


def claim_output_dir(cfg: QLoraConfig, required: bool = True) -> Optional[Path]:
    """cfg.output_dir resolved; refused when it exists and is not empty, unless overwrite=true."""
    if not cfg.output_dir:
        if required:
            raise UserError("give the folder to write: output_dir=DIR")
        return None
    out = Path(cfg.output_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"output_dir={out} exists and is not empty; pass overwrite=true or another folder")
    return out
