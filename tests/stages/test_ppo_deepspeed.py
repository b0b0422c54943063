"""PPOTrainer under the real DeepSpeed launcher: 2 CPU ranks over gloo, ZeRO-2 and ZeRO-3, 2 PPO steps,
a consolidated actor checkpoint that loads as a plain Hugging Face model, then a resume to step 3.

Marked slow (two processes, ~1 minute per ZeRO stage on 2 cores): `python -m pytest -m slow tests/stages/test_ppo_deepspeed.py`.
"""

import os
import sys
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from stages.core import distributed
    from stages.ppo import PPOConfig, PPOTrainer

    distributed.setup()  # as every stage does first: no 45 s shared-memory kernel build on CPU ranks

    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--local_rank")]  # added by the launcher
    root, deepspeed_config, output_dir, gather = Path(arguments[0]), arguments[1], Path(arguments[2]), arguments[3] == "gather"
    model_config = yaml.safe_load((root / "stages/core/resources/models/tiny-llama.yaml").read_text())["config"]
    tokenizer = AutoTokenizer.from_pretrained(root / "stages/core/resources/tiny_tokenizer")

    def build(auto_class, seed, **extra):
        torch.manual_seed(seed)  # the same initial weights on every rank
        return auto_class.from_config(AutoConfig.for_model(**model_config, **extra))

    actor, reference = build(AutoModelForCausalLM, 0), build(AutoModelForCausalLM, 0)
    reward_model, critic = build(AutoModelForSequenceClassification, 1, num_labels=1), build(AutoModelForSequenceClassification, 2, num_labels=1)
    prompts = [[{"role": "user", "content": "q" * (1 + index % 7)}] for index in range(16)]
    steps = []
    config = PPOConfig(num_steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6,
                       actor_learning_rate=1e-3, critic_learning_rate=1e-3, save_steps=1, sample_table_every=None,
                       gather_params_for_generation=gather)
    trainer = PPOTrainer(actor, reference, reward_model, critic, tokenizer, prompts, config, output_dir,
                         deepspeed_config=deepspeed_config, log_hook=lambda step, metrics, samples: steps.append(metrics))
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in history), history
    assert trainer.world_size == 2
    if trainer.rank == 0:
        assert len(steps) == 2, steps
    if trainer.rank == 1:  # the slower rank must not find rank 0's fresh model and refuse (a ZeRO-2 race once seen)
        time.sleep(3)
    trainer.save_model(output_dir / "final")

    # Resume under DeepSpeed: new engines around freshly built models load checkpoint-2 and run step 3.
    actor, reference = build(AutoModelForCausalLM, 5), build(AutoModelForCausalLM, 0)
    reward_model, critic = build(AutoModelForSequenceClassification, 1, num_labels=1), build(AutoModelForSequenceClassification, 6, num_labels=1)
    config.num_steps = 3
    resumed = PPOTrainer(actor, reference, reward_model, critic, tokenizer, prompts, config, output_dir, deepspeed_config=deepspeed_config)
    assert len(resumed.train(resume=True)) == 1
    print(f"rank {trainer.rank}: done, reward {history[-1]['ppo/reward_raw']:.4f}")
    """
)


@pytest.mark.parametrize(
    ("zero_config", "gather"),
    # ZeRO-3 generation both ways: with the actor gathered, and layer by layer with synced ranks.
    [("zero2.json", "gather"), ("zero3.json", "gather"), ("zero3.json", "no-gather")],
)
def test_two_ranks_train_and_save_a_loadable_actor(zero_config, gather, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output_dir = tmp_path / "run"
    environment = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",  # two ranks on two cores: more threads only contend
    }
    with socket.socket() as probe:  # a free port, so concurrent launches do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The launcher as a module of this interpreter: works whether or not the venv's bin is on PATH.
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port), str(driver), str(ROOT), str(ROOT / "deepspeed_configs" / zero_config), str(output_dir), gather]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "rank 0: done" in result.stdout and "rank 1: done" in result.stdout

    assert (output_dir / "final" / "model.safetensors").is_file()
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(AutoConfig.for_model(**yaml.safe_load((ROOT / "stages/core/resources/models/tiny-llama.yaml").read_text())["config"]))
    trained_parameters, initial_parameters = dict(trained.named_parameters()), dict(initial.named_parameters())
    assert trained_parameters.keys() == initial_parameters.keys()
    # Full tensors (a ZeRO-3 save without gathering would write empty shards), finite, and trained.
    assert all(trained_parameters[name].shape == initial_parameters[name].shape for name in initial_parameters)
    assert all(torch.isfinite(parameter).all() for parameter in trained_parameters.values())
    assert any(not torch.equal(trained_parameters[name], initial_parameters[name]) for name in initial_parameters)
    assert sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
