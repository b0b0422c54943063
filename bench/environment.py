"""The environment every arm runs under. Its own module, importing nothing, because the bench's parent
must set it before torch and transformers are imported: arms are forked from that parent (bench/runner.py)."""

from __future__ import annotations


def arm_environment(threads: int) -> dict[str, str]:
    """Pinned threads, no network, no W&B, quiet libraries."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore", "BENCH_THREADS": str(threads)}
