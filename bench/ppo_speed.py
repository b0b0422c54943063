"""PPO throughput on the embedded tiny Llama: episodes/s and where a step's time goes.

Run from the repository root: python -m bench.ppo_speed [--steps 5] [--threads N]
Setting of the DESIGN.md speed anchor (TRL 1.11's PPOTrainer: about 70 episodes/s on this machine):
batch 64, responses of 10 tokens, 4 PPO epochs x 4 mini-batches, random reward model and critic.
Numbers only; nothing is asserted. On a shared 2-core machine compare runs at the same --threads: two
OpenMP threads competing with another process can be ten times slower than one.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from stages.ppo import PPOConfig, PPOTrainer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="PPO steps timed after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_config = yaml.safe_load((ROOT / "configs/models/tiny-llama.yaml").read_text())["config"]
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets/tiny_tokenizer")
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    reference.load_state_dict(actor.state_dict())
    critic = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**model_config, num_labels=1))
    reward_model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**model_config, num_labels=1))
    prompts = [[{"role": "user", "content": f"what is {i} + {2 * i}?"}] for i in range(512)]
    config = PPOConfig(
        num_steps=args.steps + 1, batch_size=64, mini_batch_size=16, ppo_epochs=4, max_new_tokens=10,
        # Random weights seldom sample eos, so responses run close to the full 10 tokens (mean printed below).
        save_steps=None, sample_table_every=None,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = PPOTrainer(actor, reference, reward_model, critic, tokenizer, prompts, config, output_dir)
        started = time.perf_counter()
        history = trainer.train()
        elapsed = time.perf_counter() - started
    timed = history[1:]  # the first step pays for warm-up; the time/* metrics exclude checkpoint writes
    split = {name: sum(metrics[f"time/{name}"] for metrics in timed) for name in ("generation", "scoring", "training")}
    total = sum(split.values())
    episodes = len(timed) * config.batch_size
    print(f"threads: {torch.get_num_threads()}  steps timed: {len(timed)}  (whole run incl. warm-up: {elapsed:.1f} s)")
    print(f"episodes/s: {episodes / total:.1f}")
    print(f"mean response length: {sum(m['ppo/response_length'] for m in timed) / len(timed):.1f} tokens")
    for name, seconds in split.items():
        print(f"{name:>10}: {seconds / len(timed):.3f} s/step  ({100 * seconds / total:.0f}%)")


if __name__ == "__main__":
    main()
