"""What a finished run says about itself in MLflow: description, long-form tables, inputs.

Pure functions of the run's history; the runner logs what they return. The description is the
``mlflow.note.content`` tag (markdown, shown on the run page); the tables are long form, one row
per matrix cell, so that the UI's evaluation view can compare runs cell by cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lifelong_moe import names

# The MLflow dataset table keeps at most 36 characters of digest.
DIGEST_CHARS = 36


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded, for files people read (summary.json).

    The full-precision numbers stay in the MLflow metrics and in accuracy_matrix.json.
    """
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def _matrix_markdown(M: Sequence[Sequence[float]], fmt: str) -> list[str]:
    T = len(M[0]) if M else 0
    lines = [
        "| after \\ on | " + " | ".join(f"exp {j}" for j in range(T)) + " |",
        "|---|" + "---:|" * T,
    ]
    lines += [
        f"| {i} | " + " | ".join(format(v, fmt) for v in row) + " |" for i, row in enumerate(M)
    ]
    return lines


def description(
    run: Mapping[str, str],
    R: Sequence[Sequence[float]],
    final: Mapping[str, float],
    perplexity: Sequence[Sequence[float]] | None = None,
) -> str:
    """The run page's markdown: what ran, its matrix (3 digits) and its headline metrics.

    ``run`` holds method, benchmark, model and seed (the tags of the same name).
    """
    lines = [
        f"**{run['method']}** on **{run['benchmark']}** (model {run['model']}, "
        f"seed {run['seed']}): {len(R)} experiences.",
        "",
    ]
    if perplexity:
        lines += ["Perplexity after training on row i, tested on column j:", ""]
        lines += _matrix_markdown(perplexity, ".3f") + [""]
    else:
        lines += ["Accuracy R[i][j] after training on row i, tested on column j:", ""]
        lines += _matrix_markdown(R, ".3f") + [""]
    lines += ["| metric | value |", "|---|---:|"]
    for key, value in final.items():
        text = f"{value:,.0f}" if key.startswith(names.cost_params("")) else f"{value:.3f}"
        lines.append(f"| `{key}` | {text} |")
    return "\n".join(lines) + "\n"


def running_description(run: Mapping[str, str], n_experiences: int) -> str:
    """Shown while the run trains; replaced by :func:`description` when it finishes."""
    return (
        f"**{run['method']}** on **{run['benchmark']}** (model {run['model']}, "
        f"seed {run['seed']}): {n_experiences} experiences; results appear here when it finishes.\n"
    )


def matrix_table(value: str, M: Sequence[Sequence[float]], **more: Sequence[Sequence[float]]):
    """Long form of a matrix: columns trained_on, evaluated_on, ``value`` (and ``more``)."""
    table: dict[str, list] = {"trained_on": [], "evaluated_on": [], value: []}
    table |= {k: [] for k in more}
    for i, row in enumerate(M):
        for j, v in enumerate(row):
            table["trained_on"].append(i)
            table["evaluated_on"].append(j)
            table[value].append(float(v))
            for k, other in more.items():
                table[k].append(float(other[i][j]))
    return table


def routing_table(routing: Mapping[str, Any]) -> dict[str, list]:
    """Long form of the routing shares after every experience (``routing_record`` layout).

    One row per (trained_on, layer, evaluated_on, expert): the share of test experience
    ``evaluated_on``'s (token, slot) assignments that reach ``expert`` in ``layer``, with the
    experience that grew the expert (``expert_origin``).
    """
    origin = routing["expert_origin"]
    table: dict[str, list] = {
        k: [] for k in ("trained_on", "layer", "evaluated_on", "expert", "expert_origin", "share")
    }
    for i, layers in enumerate(routing["per_experience"]):
        for layer, shares in layers.items():
            for j, per_expert in enumerate(shares):
                for e, share in enumerate(per_expert):
                    table["trained_on"].append(i)
                    table["layer"].append(layer)
                    table["evaluated_on"].append(j)
                    table["expert"].append(e)
                    table["expert_origin"].append(origin[e] if e < len(origin) else -1)
                    table["share"].append(float(share))
    return table


def dataset_inputs(benchmark: Mapping[str, Any], stream: Any) -> list[dict[str, str]]:
    """The data a run trained on, as MLflow dataset inputs (name, digest, source, profile).

    Text domains carry the sha256 of their exact bytes (data/text.py): the digest is its first
    36 hex digits (what MLflow's dataset table holds), the profile the domain's whole record
    (``DomainInfo.record``: full hash, where the text came from, sizes, deduplication). Other
    benchmarks are generated from their config (downloaded or bundled data, a fixed seed): their
    digest hashes the resolved benchmark config and the experiences' class lists, which is what
    decides the data.
    """
    name = str(benchmark.get("name", stream.name))
    domains = getattr(stream, "domains", None)
    if domains:
        records = [d.record() for d in domains]
        return [
            {
                "name": f"{name}/{r['name']}",
                "digest": r["sha256"][:DIGEST_CHARS],
                "source_type": "text_domain",
                "source": json.dumps({"where": r["where"]}),
                "profile": json.dumps(r),
                "context": f"experience_{i}",
            }
            for i, r in enumerate(records)
        ]
    config = {k: v for k, v in benchmark.items() if k != "name"}
    classes = [list(map(int, e.classes)) for e in stream.experiences]
    blob = json.dumps({"config": config, "classes": classes}, sort_keys=True, default=str)
    return [
        {
            "name": name,
            "digest": hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS],
            "source_type": "benchmark_config",
            "source": json.dumps(config, sort_keys=True, default=str),
            "profile": json.dumps(
                {
                    "n_experiences": len(stream),
                    "n_classes": stream.n_classes,
                    "input_shape": list(stream.input_shape),
                    "scenario": stream.scenario,
                    "classes": classes,
                }
            ),
            "context": "train",
        }
    ]
