"""Dataset mixtures: how many examples each source gives, drawn deterministically, and what was realised.

A stage lists sources (`datasets:`); each gives either a fixed `num_examples` or a `weight`. Weighted
sources share what `mixture_size` leaves after the fixed counts, in proportion to their weights (a
source with neither counts as weight 1 when mixture_size is set). Without mixture_size, every source
gives its fixed count or, lacking one, all its rows (the embedded generator: its default count).
Counts are rounded by largest remainder, so they add up to mixture_size exactly and the realised
shares are the requested ones to within one example.

A source with more rows than its count is subsampled without replacement; one with fewer is repeated
(whole passes plus a random remainder, printed). Every draw is seeded
by the stage seed and the source's position, so a mixture is the same for the same seed and config.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from stages import tasks
from stages.data.formats import DatasetSpec

# A stage's loader: (spec, position in the list, examples wanted or None for all) -> rows.
Loader = Callable[[DatasetSpec, int, "int | None"], list[dict[str, Any]]]


def plan(specs: Sequence[DatasetSpec], mixture_size: int | None) -> list[int | None]:
    """Examples to take from each source (None: all of it). Raises ValueError naming the bad source."""
    weighted = [i for i, spec in enumerate(specs) if spec.num_examples is None and (spec.weight is not None or mixture_size is not None)]
    counts: list[int | None] = [spec.num_examples for spec in specs]
    if mixture_size is None:
        if weighted:
            raise ValueError(f"datasets[{weighted[0]}] has a weight; set mixture_size (the total examples) to turn weights into counts")
        return counts
    if mixture_size <= 0:
        raise ValueError(f"mixture_size must be positive, got {mixture_size}")
    remaining = mixture_size - sum(spec.num_examples or 0 for spec in specs)
    if remaining < 0 or (remaining > 0 and not weighted) or (remaining == 0 and weighted):
        fixed = sum(spec.num_examples or 0 for spec in specs)
        raise ValueError(
            f"mixture_size={mixture_size} does not fit the sources: fixed num_examples add up to {fixed}"
            + ("" if weighted else " and no source has a weight to fill the rest")
        )
    weights = [specs[i].weight if specs[i].weight is not None else 1.0 for i in weighted]
    exact = [remaining * weight / sum(weights) for weight in weights]
    shares = [math.floor(value) for value in exact]
    # Largest remainder: the examples lost to rounding go to the sources that lost most (ties: first listed).
    by_remainder = sorted(range(len(exact)), key=lambda k: (shares[k] - exact[k], k))
    for k in by_remainder[: remaining - sum(shares)]:
        shares[k] += 1
    for i, share in zip(weighted, shares):
        if share == 0:
            raise ValueError(f"datasets[{i}] ({specs[i].label}) gets 0 of {mixture_size} examples at weight {specs[i].weight}; raise it or mixture_size")
        counts[i] = share
    return counts


def check(specs: Sequence[DatasetSpec], mixture_size: int | None, heldout_tasks: list[str]) -> None:
    """Parse-time checks of a stage's sources: weights become counts, embedded families leave some to train on."""
    plan(specs, mixture_size)
    for spec in specs:
        if spec.source == "embedded":
            tasks.training_families(spec.tasks, heldout_tasks)


def strip_source(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the `source` tag (trainers would take it for a data column)."""
    return [{key: value for key, value in row.items() if key != "source"} for row in rows]


def take(rows: list[dict[str, Any]], count: int | None, rng: random.Random) -> list[dict[str, Any]]:
    """`count` rows: a random subset if there are enough, else whole passes plus a random remainder."""
    if count is None or count == len(rows):
        return list(rows)
    passes, remainder = divmod(count, len(rows))
    return rows * passes + rng.sample(rows, remainder)


def mix(specs: Sequence[DatasetSpec], mixture_size: int | None, seed: int, load: Loader) -> list[dict[str, Any]]:
    """Load every source, take its planned count, tag rows with their source, and shuffle them together."""
    labels = unique_labels(specs)
    rows: list[dict[str, Any]] = []
    for index, (spec, count) in enumerate(zip(specs, plan(specs, mixture_size))):
        loaded = load(spec, index, count)
        if not loaded:
            raise ValueError(f"datasets[{index}] ({labels[index]}) gave no rows")
        rng = random.Random(f"mixture-{seed}-{index}")
        if count is not None and count > len(loaded):
            print(f"mixture: {labels[index]} has {len(loaded)} rows; repeating them to give {count} ({count / len(loaded):.1f} passes)")
        rows += [row | {"source": labels[index]} for row in take(loaded, count, rng)]
    random.Random(f"mixture-{seed}").shuffle(rows)
    return rows


def unique_labels(specs: Sequence[DatasetSpec]) -> list[str]:
    """Each source's label; repeated labels get their position appended so the report keeps them apart."""
    counts = Counter(spec.label for spec in specs)
    return [spec.label if counts[spec.label] == 1 else f"{spec.label}-{index}" for index, spec in enumerate(specs)]


def report(rows: list[dict[str, Any]], token_counts: list[int], requested: dict[str, float] | None = None) -> dict[str, float]:
    """Realised mixture as metrics: `data/SOURCE/examples`, `/tokens`, `/share` (of examples), `/token_share`; and for
    sources written by a simulated world's annotators, `/annotators/KIND` (share of the source's rows)."""
    examples: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    annotators: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row, count in zip(rows, token_counts, strict=True):
        examples[row["source"]] += 1
        tokens[row["source"]] += count
        if "annotator" in row:
            annotators[row["source"]][row["annotator"]] += 1
    metrics: dict[str, float] = {}
    for source in examples:
        metrics[f"data/{source}/examples"] = float(examples[source])
        metrics[f"data/{source}/tokens"] = float(tokens[source])
        metrics[f"data/{source}/share"] = examples[source] / len(rows)
        metrics[f"data/{source}/token_share"] = tokens[source] / max(sum(tokens.values()), 1)
        if requested and source in requested:
            metrics[f"data/{source}/requested_share"] = requested[source]
        for kind, count in sorted(annotators[source].items()):
            metrics[f"data/{source}/annotators/{kind}"] = count / examples[source]
    return metrics


def requested_shares(specs: Sequence[DatasetSpec], mixture_size: int | None) -> dict[str, float] | None:
    """The shares the config asked for (None when there is no mixture_size to be a share of)."""
    if mixture_size is None:
        return None
    return {label: count / mixture_size for label, count in zip(unique_labels(specs), plan(specs, mixture_size))}


def describe(metrics: dict[str, float]) -> str:
    """One line per source, for the stage's log."""
    sources = sorted({key.split("/")[1] for key in metrics if key.startswith("data/")})
    lines = []
    for source in sources:
        line = (
            f"  {source}: {metrics[f'data/{source}/examples']:.0f} examples ({metrics[f'data/{source}/share']:.1%}), "
            f"{metrics[f'data/{source}/tokens']:.0f} tokens ({metrics[f'data/{source}/token_share']:.1%})"
        )
        if f"data/{source}/requested_share" in metrics:
            line += f", requested {metrics[f'data/{source}/requested_share']:.1%}"
        kinds = {key.rpartition("/")[2]: value for key, value in metrics.items() if key.startswith(f"data/{source}/annotators/")}
        if kinds:
            line += "; written by " + ", ".join(f"{kind} {share:.1%}" for kind, share in kinds.items())
        lines.append(line)
    return "\n".join(lines)
