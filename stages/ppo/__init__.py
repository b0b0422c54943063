"""Our PPO for RLHF (TRL 1.x ships none): config, trainer, DeepSpeed engine plumbing, math, checkpoints.

- `config`: PPOConfig, the policy stage's `ppo:` section;
- `trainer`: PPOTrainer (rollout, scoring, GAE, clipped updates, train loop); `rollout`: the batch it trains on;
- `engine`: models wrapped for training (torch or DeepSpeed), per-token scorers, ZeRO-3 gathered
  generation, the DeepSpeed config filled from PPOConfig, collectives;
- `math`: the pure tensor math (KL penalty, GAE, whitening, clipped losses, KL controllers), torch only;
- `checkpoint`: atomic checkpoints, resume, the exported Hugging Face model.

May import: `stages.core`, `stages.generation`, `stages.logprobs`; not `reward/` (a reward model is any
module with a scalar head, or a likelihood head read through `token_scores`) and nothing above.
"""

from stages.ppo.checkpoint import HISTORY_FILE
from stages.ppo.config import PPOConfig
from stages.ppo.trainer import PPOTrainer

__all__ = ["HISTORY_FILE", "PPOConfig", "PPOTrainer"]
