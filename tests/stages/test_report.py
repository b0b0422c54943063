"""`rlhf report`: the page and figures drawn from what a run leaves on disk, checked in a real headless
browser; the history files the report reads (PPO's across a resume, HF's kept from the last checkpoint).

The runs are written here, not trained: a DPO run and a PPO run from the same SFT model, with the
files `rlhf run` leaves (summary.json, trainer_state.json / history.jsonl, samples.json, registry entries).
Chromium is required, not optional: CI (.ci/run) installs it; without it these tests fail and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import recipe, report
from stages.report import figures
from stages.core import checkpoints
from stages.cli import main as cli_main
from stages.core.registry import Registry

# matplotlib's first two colours: run 1's curves and run 2's.
RUN_COLOURS = {"C0": (31, 119, 180), "C1": (255, 127, 14)}
PHASE_COLOURS = [(44, 160, 44), (214, 39, 40), (148, 103, 189)]  # C2-C4: generation, scoring, training
SFT_TITLES = ["SFT training loss"]
REWARD_TITLES = ["Reward model training loss", "Reward model pairwise accuracy", "Reward model reward margin"]
OVEROPTIMISATION_TITLE = "Over-optimisation: proxy and gold reward against KL"
OVEROPTIMISATION_KEYS = figures.OVEROPTIMISATION.keys
PPO_TITLES = ["Policy training loss", "Policy reward", "Policy KL to reference", "Policy entropy", "Policy response length",
              OVEROPTIMISATION_TITLE, "PPO time per phase"]
DPO_TITLES = ["Policy training loss", "Policy entropy", "DPO preference accuracy", "DPO implicit reward margin"]
PROMPTS = ["Add 12 and 7.", "Reverse the word: cat", "Upper-case: dog"]
ANSWERS = ["19", "tac", "DOG"]


# -- a fake run ----------------------------------------------------------------------------------

def _write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _hf_history(steps: int, **curves) -> dict:
    """trainer_state.json as HF Trainer writes it: one log entry per logging step, then the train summary."""
    log = [{"step": step, "epoch": step / steps, "learning_rate": 1e-3, **{key: fn(step) for key, fn in curves.items()}}
           for step in range(5, steps + 1, 5)]
    return {"global_step": steps, "log_history": log + [{"step": steps, "train_loss": 0.5, "train_runtime": 12.0}]}


def make_run(home: Path, name: str, algorithm: str) -> dict:
    """A finished recipe run's files and registry entries; returns its summary."""
    registry, run_dir = Registry(home), home / name
    sft = registry.mark_ready(registry.begin(f"{name}/sft", "sft", run_dir / "sft", parent="tiny-llama", run=name).ref,
                              metrics={"eval/exact_match": 0.61})
    reward = registry.mark_ready(registry.begin(f"{name}/reward", "reward", run_dir / "reward", parent=sft.ref, run=name).ref,
                                 metrics={"eval/pairwise_accuracy": 0.83})
    policy_metrics = {"eval/exact_match": 0.7 if algorithm == "dpo" else 0.66, "eval/reward_mean": 1.25, "eval/kl_to_ref": 0.123456}
    policy = registry.mark_ready(registry.begin(f"{name}/policy", "policy", run_dir / "policy", parent=sft.ref, run=name).ref,
                                 metrics=policy_metrics | {"algorithm": algorithm})

    _write(run_dir / "sft" / "trainer_state.json", _hf_history(100, loss=lambda s: 3.0 / s ** 0.5))
    _write(run_dir / "sft" / "samples.json", [{"prompt": p, "response": a, "answer": a} for p, a in zip(PROMPTS, ANSWERS)])
    _write(run_dir / "reward" / "trainer_state.json",
           _hf_history(60, loss=lambda s: 0.7 - s / 200, accuracy=lambda s: 0.5 + s / 200, margin=lambda s: s / 30))
    _write(run_dir / "reward" / "samples.json", [{"prompt": PROMPTS[0], "chosen": "19", "rejected": "18"}])
    if algorithm == "dpo":
        _write(run_dir / "policy" / "trainer_state.json", _hf_history(
            40, loss=lambda s: 0.69 - s / 100, entropy=lambda s: 2.0 - s / 50,
            **{"rewards/accuracies": lambda s: 0.5 + s / 100, "rewards/margins": lambda s: s / 20}))
    else:
        steps = [{"step": step, "ppo/policy_loss": -0.01 * step, "ppo/reward_raw": 0.1 * step, "ppo/kl": 0.02 * step,
                  "ppo/entropy": 2.0 - 0.05 * step, "ppo/response_length": 8.0 + step % 3,
                  # the proxy climbs all along; the gold reward peaks at step 10 and falls: over-optimisation
                  "ppo/proxy_reward": 0.1 * step, "ppo/gold_reward": 0.5 - abs(step - 10) / 40,
                  "time/generation": 0.5, "time/scoring": 0.2, "time/training": 1.0} for step in range(1, 21)]
        (run_dir / "policy").mkdir(parents=True)
        (run_dir / "policy" / "history.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    _write(run_dir / "policy" / "samples.json", [
        {"prompt": p, "response": a if i else "20", "answer": a, "reward": 1.5 - i, "reference_response": "wrong", "reference_reward": -0.75}
        for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))
    ])
    summary = {"run": name, "stages": [
        {"stage": "sft", "algorithm": None, "registry": sft.ref, "output_dir": sft.path, "seconds": 30.0, "metrics": sft.metrics,
         "start": {"registry": "tiny-llama", "metrics": {"eval/exact_match": 0.015}}},
        {"stage": "reward", "algorithm": None, "registry": reward.ref, "output_dir": reward.path, "seconds": 20.0, "metrics": reward.metrics},
        {"stage": "policy", "algorithm": algorithm, "registry": policy.ref, "output_dir": policy.path, "seconds": 40.0, "metrics": policy_metrics},
    ]}
    _write(run_dir / "summary.json", summary)
    return summary


# -- the browser ---------------------------------------------------------------------------------

def chromium() -> str:
    found = shutil.which(os.environ.get("CHROMIUM") or "chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: the report test renders the page in a real browser. "
                    "Install it (`apt-get install -y chromium`; CI's .ci/run does) or set CHROMIUM=/path/to/it.")
    return found


def render(page: Path, tmp_path: Path) -> tuple[str, Image.Image]:
    """The page's DOM after load, and a 1200x3000 screenshot, from headless Chromium."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    screenshot = tmp_path / "screenshot.png"
    shot = subprocess.run([*base, f"--screenshot={screenshot}", "--window-size=1200,3000", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.returncode == 0 and screenshot.is_file() and screenshot.stat().st_size > 0, shot.stderr[-2000:]
    return dom.stdout, Image.open(screenshot).convert("RGB")


def colour_pixels(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    pixels = np.asarray(image, dtype=np.int16)  # (height, width, 3)
    return int((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).sum())


def figure(out: Path, title: str) -> Image.Image:
    """The PNG whose embedded title is `title` (exactly one)."""
    images = [Image.open(path) for path in sorted((out / "figures").glob("*.png")) if path.stat().st_size > 0]
    matches = [image for image in images if image.text.get("Title") == title]
    assert len(matches) == 1, f"{title!r}: {len(matches)} figures; titles: {[image.text.get('Title') for image in images]}"
    return matches[0].convert("RGB")


def check_rendered(page: Path, tmp_path: Path, titles: list[str]) -> tuple[str, Image.Image]:
    dom, screenshot = render(page, tmp_path)
    loaded, total = (re.search(rf'data-images-{kind}="(\d+)"', dom) for kind in ("loaded", "total"))
    assert loaded and total, "the page's load script did not run: " + dom[:500]
    assert int(total.group(1)) == len(list((page.parent / "figures").glob("*.png"))) == int(loaded.group(1)), "a figure failed to load"
    assert "data-errors" not in dom, "the browser reported an error event"
    for title in titles:
        assert f"<figcaption>{title}</figcaption>" in dom
    assert screenshot.size == (1200, 3000)
    assert colour_pixels(screenshot, RUN_COLOURS["C0"]) > 200, "no curve pixels in the screenshot"
    return dom, screenshot


# -- tests ---------------------------------------------------------------------------------------

def test_one_run_report_has_every_figure_table_and_renders(isolated_home, tmp_path, capsys):
    summary = make_run(isolated_home, "ppo-run", "ppo")
    assert cli_main(["report", "ppo-run"]) == 0
    page = isolated_home / "ppo-run" / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(page)

    out = page.parent
    titles = SFT_TITLES + REWARD_TITLES + PPO_TITLES
    assert len(list((out / "figures").glob("*.png"))) == len(titles)
    for title in titles[:-1]:  # curves: drawn in run 1's colour
        assert colour_pixels(figure(out, title), RUN_COLOURS["C0"]) > 100, f"{title}: no curve drawn"
    time_split = figure(out, "PPO time per phase")
    phase_pixels = [colour_pixels(time_split, colour) for colour in PHASE_COLOURS]
    # Bars are proportional to the seconds summed over 20 steps: 10 s, 4 s, 20 s.
    assert phase_pixels[2] > phase_pixels[0] > phase_pixels[1] > 0, phase_pixels

    text = page.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text), "the page must load nothing from the network"
    assert "DPO" not in text, "a PPO run lists no DPO panels, not even as missing"
    for stage in summary["stages"]:  # the held-out table holds summary.json's numbers
        for value in stage["metrics"].values():
            assert f">{value:.3f}</td>" in text, value
    assert "0.123456" in text  # the full value, on hover
    table = text[text.index("Held-out metrics"):text.index("Training curves")]
    assert re.search(r"<tr><td>base</td><td>–</td><td>tiny-llama</td><td>-</td><td class=num[^>]*>0\.015</td>", table), table
    for prompt in PROMPTS:
        assert prompt in text
    assert "<code>wrong</code> ✗" in text and "<code>tac</code> ✓" in text  # SFT answer vs policy answer, checked
    lineage = text[text.index("Lineage of the final model"):]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", lineage)  # (role, model) of each row
    assert rows == [("final model", "ppo-run/policy:1"), ("parent", "ppo-run/sft:1"), ("parent", "tiny-llama"),
                    ("reward model of the policy stage", "ppo-run/reward:1")]

    check_rendered(page, tmp_path, titles)


def test_overoptimisation_figure_reads_our_ppo_and_trls_keys(isolated_home):
    """Proxy and gold at each step's KL: from our PPO's history and from GRPO's trainer_state.json (TRL names the reward
    model's mean after the model, so the proxy is any rewards/*/mean but the verifier's); a DPO run has none."""
    make_run(isolated_home, "ppo-run", "ppo")
    ppo = report.load_run("ppo-run")
    assert figures._overoptimisation_figure([ppo]) is not None
    assert figures._first_logged(ppo.stages["policy"].history, OVEROPTIMISATION_KEYS[1]) == "ppo/proxy_reward"

    make_run(isolated_home, "grpo-run", "dpo")  # a policy stage, its history then rewritten as GRPO logs it
    grpo_history = _hf_history(20, kl=lambda s: 0.01 * s, **{"rewards/reward/mean": lambda s: s / 10,
                                                              "rewards/exact_answer_reward/mean": lambda s: 0.6 - s / 100})
    _write(isolated_home / "grpo-run" / "policy" / "trainer_state.json", grpo_history)
    grpo = report.load_run("grpo-run")
    grpo.stages["policy"].algorithm = "grpo"
    history = grpo.stages["policy"].history
    gold = figures._first_logged(history, OVEROPTIMISATION_KEYS[2])
    assert gold == "rewards/exact_answer_reward/mean"
    assert figures._first_logged(history, OVEROPTIMISATION_KEYS[1], exclude=gold) == "rewards/reward/mean"
    drawn = figures._overoptimisation_figure([grpo])
    proxy_line, = drawn.axes[0].get_lines()
    gold_line, = drawn.axes[1].get_lines()
    assert list(proxy_line.get_xdata()) == pytest.approx([0.05, 0.1, 0.15, 0.2])  # x is KL, not the step
    assert list(gold_line.get_ydata()) == pytest.approx([0.55, 0.5, 0.45, 0.4])

    dpo = report.load_run("grpo-run")  # the same files as a DPO run: no figure, not even listed as missing
    assert figures._overoptimisation_figure([dpo]) is None


def test_two_runs_overlay_their_curves_in_one_page(isolated_home, tmp_path):
    make_run(isolated_home, "dpo-run", "dpo")
    make_run(isolated_home, "ppo-run", "ppo")
    page = report.write_report(["dpo-run", "ppo-run"], out=tmp_path / "compare")

    out = page.parent
    for title in SFT_TITLES + REWARD_TITLES + ["Policy training loss", "Policy entropy"]:  # both runs logged these
        image = figure(out, title)
        assert colour_pixels(image, RUN_COLOURS["C0"]) > 100 and colour_pixels(image, RUN_COLOURS["C1"]) > 100, title
    kl = figure(out, "Policy KL to reference")  # only PPO samples a KL while training
    assert colour_pixels(kl, RUN_COLOURS["C0"]) == 0 and colour_pixels(kl, RUN_COLOURS["C1"]) > 100
    dpo_margin = figure(out, "DPO implicit reward margin")
    assert colour_pixels(dpo_margin, RUN_COLOURS["C0"]) > 100 and colour_pixels(dpo_margin, RUN_COLOURS["C1"]) == 0

    text = page.read_text()
    metrics = text[text.index("<table class=metrics>"):text.index("</table>")]
    assert metrics.count("<tr>") == 1 + 8  # header, (base as SFT scored it + 3 stages) x 2 runs
    assert "<td>dpo-run</td><td>base</td>" in metrics and "<td>ppo-run</td><td>base</td>" in metrics
    assert "<td>dpo-run</td><td>policy</td><td>dpo</td>" in metrics and "<td>ppo-run</td><td>policy</td><td>ppo</td>" in metrics
    assert ">0.700</td>" in metrics and ">0.660</td>" in metrics

    dom, screenshot = check_rendered(page, tmp_path, SFT_TITLES + REWARD_TITLES + ["Policy KL to reference", "PPO time per phase"])
    assert colour_pixels(screenshot, RUN_COLOURS["C1"]) > 200, "the second run's curves are not on the page"


def test_report_refuses_a_missing_run_and_a_folder_it_did_not_write(isolated_home, tmp_path, capsys):
    assert cli_main(["report", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    make_run(isolated_home, "r", "dpo")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(report.ReportError, match="already holds other files"):
        report.write_report(["r"], out=foreign)
    assert report.write_report(["r"]) == report.write_report(["r"])  # its own earlier report is replaced


def test_recipe_warns_instead_of_failing_when_the_report_cannot_be_written(isolated_home, capsys):
    recipe._write_report("never-ran")
    assert "warning: no report" in capsys.readouterr().err


def test_ppo_history_survives_a_resume_and_outlives_the_checkpoints(tmp_path):
    """Steps 1-2, a crash at step 3, a resume to 3: the kept history has steps 1, 2, 3 once each, and
    steps 1-2 are those the first trainer logged. Then the stage's cleanup keeps it from the last checkpoint."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from stages.ppo import HISTORY_FILE, PPOConfig, PPOTrainer

    root = Path(__file__).resolve().parents[2]
    model_config = AutoConfig.for_model(**yaml.safe_load((root / "stages/core/resources/models/tiny-llama.yaml").read_text())["config"])
    tokenizer = AutoTokenizer.from_pretrained(root / "stages/core/resources/tiny_tokenizer")
    torch.set_num_threads(1)

    class Crash(Exception):
        pass

    def trainer(log_hook=None) -> PPOTrainer:
        torch.manual_seed(0)
        actor = AutoModelForCausalLM.from_config(model_config)
        classifier = AutoConfig.for_model(**model_config.to_dict() | {"num_labels": 1})
        settings = PPOConfig(num_steps=3, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, save_steps=1,
                             sample_table_every=None)
        prompts = [[{"role": "user", "content": "q" * n}] for n in range(1, 9)]
        return PPOTrainer(actor, AutoModelForCausalLM.from_config(model_config), AutoModelForSequenceClassification.from_config(classifier),
                          AutoModelForSequenceClassification.from_config(classifier), tokenizer, prompts, settings, tmp_path, log_hook=log_hook)

    first_steps = []

    def crash_at_step_3(step, metrics, samples):
        if step == 3:
            raise Crash
        first_steps.append({"step": step, **metrics})

    with pytest.raises(Crash):
        trainer(crash_at_step_3).train()
    trainer().train(resume=True)
    checkpoints.remove_checkpoints(tmp_path)

    assert not list(tmp_path.glob("checkpoint-*"))
    kept = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in kept] == [1, 2, 3]
    assert kept[:2] == first_steps
    assert {"ppo/reward_raw", "ppo/kl", "ppo/entropy", "ppo/response_length", "time/generation"} <= set(kept[2])
    assert [entry["step"] for entry in report._load_history(tmp_path)] == [1, 2, 3]


def test_cleanup_keeps_the_newest_hf_checkpoint_log_history(tmp_path):
    for step in (100, 200):
        _write(tmp_path / f"checkpoint-{step}" / "trainer_state.json", {"log_history": [{"step": step, "loss": 1.0}]})
    checkpoints.remove_checkpoints(tmp_path)
    assert not list(tmp_path.glob("checkpoint-*"))
    assert report._load_history(tmp_path) == [{"step": 200, "loss": 1.0}]


def test_policy_samples_hold_the_reference_answer_and_its_reward(tiny_tokenizer):
    """The samples table's SFT columns: the reference (SFT) model answers the same prompts as the policy,
    scored by the same reward function (here: the answer's length, so the expected value is known)."""
    from stages import evaluation, generation
    from stages.core import models

    torch.set_num_threads(1)
    base = Registry(os.devnull).get("tiny-llama")
    policy, reference = models.load_causal_lm(base), models.load_causal_lm(base)
    torch.manual_seed(0)
    with torch.no_grad():  # the built-in initialisation is seeded: make the two models differ
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter))
    config = evaluation.EvalConfig(num_prompts=6, num_samples=3, max_new_tokens=5)
    _, samples = evaluation.policy_metrics(
        policy, reference, tiny_tokenizer, config, reward_fn=lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])
    )
    prompts = [row["prompt"] for row in evaluation.heldout_rows(config)][:3]
    expected = generation.generate(reference, tiny_tokenizer, prompts, config.max_new_tokens, config.batch_size)
    assert [sample["prompt"] for sample in samples] == [prompt[-1]["content"] for prompt in prompts]
    assert [sample["reference_response"] for sample in samples] == expected
    assert [sample["reference_reward"] for sample in samples] == [float(len(answer)) for answer in expected]
    assert [sample["reward"] for sample in samples] == [float(len(sample["response"])) for sample in samples]
    assert any(sample["response"] != sample["reference_response"] for sample in samples), "two different models, same answers"
