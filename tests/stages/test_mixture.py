"""Dataset mixtures: counts from weights and fixed sizes, deterministic draws, realised shares reported."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stages import data
from stages.data import mixture
from stages.core.config import ConfigError, load_config
from stages.data import DatasetSpec


def _jsonl(tmp_path: Path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def _load(spec: DatasetSpec, index: int, count: int | None) -> list[dict]:
    return data.load_sft_rows(spec, seed=7 + index, count=count)


def test_plan_arithmetic() -> None:
    """mixture_size 1000, one fixed source of 100 and weights 2:1:1 on the other three.
    The weighted sources share 1000 - 100 = 900: 2/4 * 900 = 450, 1/4 * 900 = 225 and 225."""
    specs = [DatasetSpec(num_examples=100), DatasetSpec(weight=2.0), DatasetSpec(weight=1.0), DatasetSpec()]
    assert mixture.plan(specs, 1000) == [100, 450, 225, 225]
    # Without mixture_size: fixed counts as given, None = all rows.
    assert mixture.plan([DatasetSpec(num_examples=5), DatasetSpec()], None) == [5, None]


def test_plan_rounds_by_largest_remainder() -> None:
    """10 examples at weights 1:1:1 are 3.33 each: floors give 9, and the one left over goes to the
    first listed (equal remainders); 100 at 0.5:0.25:0.25 is exact."""
    assert mixture.plan([DatasetSpec(weight=1.0)] * 3, 10) == [4, 3, 3]
    assert mixture.plan([DatasetSpec(weight=0.5), DatasetSpec(weight=0.25), DatasetSpec(weight=0.25)], 100) == [50, 25, 25]
    # 7 at 0.6:0.4 are 4.2 and 2.8: floors 4 and 2, the one left goes to the larger remainder (0.8).
    assert mixture.plan([DatasetSpec(weight=0.6), DatasetSpec(weight=0.4)], 7) == [4, 3]


@pytest.mark.parametrize(
    "specs, size, message",
    [
        ([DatasetSpec(weight=1.0)], None, r"datasets\[0\] has a weight; set mixture_size"),
        ([DatasetSpec(num_examples=600), DatasetSpec(weight=1.0)], 500, "fixed num_examples add up to 600"),
        ([DatasetSpec(num_examples=400)], 500, "no source has a weight to fill the rest"),
        ([DatasetSpec(weight=1000.0), DatasetSpec(name="tiny", weight=0.001)], 100, r"datasets\[1\] \(tiny\) gets 0 of 100"),
    ],
)
def test_plan_errors_name_the_source(specs: list[DatasetSpec], size: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mixture.plan(specs, size)


def test_spec_errors() -> None:
    with pytest.raises(ValueError, match="either num_examples .* or weight"):
        DatasetSpec(num_examples=10, weight=0.5)
    with pytest.raises(ValueError, match="weight must be positive"):
        DatasetSpec(weight=0.0)
    with pytest.raises(ValueError, match="set templates"):
        DatasetSpec(source="d.jsonl", fanout=2)


def test_stage_config_checks_the_mixture(tmp_path: Path) -> None:
    from stages.sft import SFTStageConfig

    with pytest.raises(ConfigError, match="has a weight; set mixture_size"):
        load_config(SFTStageConfig, ["datasets=[{source: embedded, weight: 0.5}]"])
    config = load_config(SFTStageConfig, ["mixture_size=100", "datasets=[{source: embedded, weight: 3}, {source: embedded, tasks: [add]}]"])
    assert mixture.plan(config.datasets, config.mixture_size) == [75, 25]


def test_take_subsamples_or_repeats() -> None:
    rows = [{"i": i} for i in range(10)]
    subset = mixture.take(rows, 4, random.Random(0))
    assert len(subset) == 4 and len({row["i"] for row in subset}) == 4
    repeated = mixture.take(rows, 25, random.Random(0))
    counts = [sum(row["i"] == i for row in repeated) for i in range(10)]
    assert len(repeated) == 25 and sorted(counts) == [2] * 5 + [3] * 5  # two whole passes + 5 distinct extras


def test_mix_of_ten_thousand_honours_weights_and_is_deterministic(tmp_path: Path) -> None:
    """Embedded generator, a small prompt/completion file (repeated to fill its share) and an Alpaca
    file rephrased through templates with fan-out, at 0.5 / 0.3 / 0.2 of 10,000 examples."""
    qa = _jsonl(tmp_path, "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(700)])
    alpaca = _jsonl(tmp_path, "alpaca.jsonl", [{"instruction": f"Do {i}", "input": "", "output": f"done {i}"} for i in range(3000)])
    templates = str(Path(__file__).resolve().parents[2] / "configs/templates/alpaca.yaml")
    specs = [
        DatasetSpec(weight=0.5),
        DatasetSpec(source=qa, weight=0.3, columns={"prompt": "question", "completion": "answer"}),
        DatasetSpec(source=alpaca, name="instructions", weight=0.2, templates=templates, fanout=2),
    ]
    rows = mixture.mix(specs, 10_000, seed=3, load=_load)
    assert len(rows) == 10_000
    requested = mixture.requested_shares(specs, 10_000)
    metrics = mixture.report(rows, [len(str(row["prompt"])) for row in rows], requested)
    for source, share in {"embedded": 0.5, "qa": 0.3, "instructions": 0.2}.items():
        assert abs(metrics[f"data/{source}/share"] - share) <= 0.02 * share, (source, metrics)
        assert metrics[f"data/{source}/requested_share"] == pytest.approx(share)
        assert metrics[f"data/{source}/tokens"] > metrics[f"data/{source}/examples"]
    assert sum(metrics[f"data/{s}/examples"] for s in ("embedded", "qa", "instructions")) == 10_000
    # The sources are interleaved, not stacked.
    assert {row["source"] for row in rows[:100]} == {"embedded", "qa", "instructions"}
    # Same seed, same mixture (order included); another seed draws another one.
    assert mixture.mix(specs, 10_000, seed=3, load=_load) == rows
    assert mixture.mix(specs, 10_000, seed=4, load=_load) != rows


def test_report_counts_tokens_per_source(tiny_tokenizer) -> None:  # noqa: ANN001
    specs = [DatasetSpec(num_examples=30, tasks=["add"]), DatasetSpec(num_examples=10, tasks=["copy"])]
    rows = mixture.mix(specs, None, seed=0, load=_load)
    tokens = [data.token_count(tiny_tokenizer, row) for row in rows]
    metrics = mixture.report(rows, tokens)
    labels = mixture.unique_labels(specs)
    assert labels == ["embedded-0", "embedded-1"]
    assert metrics["data/embedded-0/examples"] == 30 and metrics["data/embedded-1/examples"] == 10
    expected = sum(t for row, t in zip(rows, tokens) if row["task"] == "add")
    assert metrics["data/embedded-0/tokens"] == expected
    assert metrics["data/embedded-0/token_share"] + metrics["data/embedded-1/token_share"] == pytest.approx(1.0)
    assert "embedded-0: 30 examples (75.0%)" in mixture.describe(metrics)
