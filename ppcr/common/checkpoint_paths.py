"""Where a run's checkpoints live and which one is the newest complete one; read by training (resume),
evaluation, export and inference alike, so it sits below all of them."""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``ckpt_dir/latest``, None when there is no complete checkpoint yet."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{path} names {tag}, which is not in {ckpt_dir}")
    return tag
