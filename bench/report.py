"""Tables from run directories: success with 95% Wilson intervals, latency, policy statistics.

Errors are counted apart and excluded from success rates. With several runs, episodes that
both runs recorded (same suite, task and init state) are paired and compared with the exact
McNemar test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.analysis import AVERAGE
from bench.records import RETRIED_ERRORS
from bench.stats import mcnemar_exact, wilson_interval

ALL_TASKS = "all"


def _stat_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if c.startswith("stats.")]
    return [c for c in cols if pd.api.types.is_numeric_dtype(df[c])]


def pooled_latencies(episodes: pd.DataFrame) -> list[float]:
    """Every query latency of the episodes, in one list."""
    return [x for lst in episodes["query_latency_ms"] for x in (lst or [])]


def _group_row(group: pd.DataFrame, stat_cols: list[str]) -> dict:
    n_success = int((group["outcome"] == "success").sum())
    n_failure = int((group["outcome"] == "failure").sum())
    judged = n_success + n_failure
    low, high = wilson_interval(n_success, judged)
    latencies = pooled_latencies(group)
    row = {
        "episodes": len(group),
        "success": n_success,
        "failure": n_failure,
        "errors": int((group["outcome"] == "error").sum()),
        "success_rate": n_success / judged if judged else math.nan,
        "ci95_low": low if judged else math.nan,
        "ci95_high": high if judged else math.nan,
        "mean_steps": float(group.loc[group["outcome"] != "error", "steps"].mean()) if judged else math.nan,
    }
    if latencies:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        row.update(latency_mean_ms=float(np.mean(latencies)), latency_p50_ms=p50, latency_p90_ms=p90,
                   latency_p99_ms=p99)
    else:
        row.update({f"latency_{name}_ms": math.nan for name in ("mean", "p50", "p90", "p99")})
    for col in stat_cols:
        row[col.removeprefix("stats.")] = float(group[col].mean())
    return row


def success_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, suite, task) and one per (run, suite) with task ``all``."""
    stat_cols = _stat_columns(df)
    rows = []
    for (run_id, suite), run_suite in df.groupby(["run_id", "suite"], sort=False):
        label = "policy_label" if "policy_label" in run_suite else "policy"
        policy = run_suite[label].iloc[0]
        for task, group in run_suite.groupby("task_index"):
            head = {"run": run_id, "policy": policy, "suite": suite, "task": str(task)}
            rows.append({**head, **_group_row(group, stat_cols)})
        head = {"run": run_id, "policy": policy, "suite": suite, "task": ALL_TASKS}
        rows.append({**head, **_group_row(run_suite, stat_cols)})
    table = pd.DataFrame(rows)
    # Columns nothing filled (latencies of a policy that never queried, stats it does not
    # report) are dropped; the rates stay, empty, when every episode was an error.
    kept = {"success_rate", "ci95_low", "ci95_high", "mean_steps"}
    empty_cols = [c for c in table.columns if c not in kept and table[c].isna().all()]
    return table.drop(columns=empty_cols)


@dataclass
class PairedComparison:
    baseline: str
    candidate: str
    pairs: int
    baseline_success: int
    candidate_success: int
    only_baseline: int  # b: baseline succeeded, candidate did not
    only_candidate: int  # c
    p_value: float

    @property
    def drop_points(self) -> float:
        """Baseline minus candidate success rate on the paired episodes, in percentage points."""
        return 100.0 * (self.baseline_success - self.candidate_success) / self.pairs if self.pairs else 0.0


# Settings that change what an episode is; the chunk length belongs to the policy compared.
PROTOCOL_FIELDS = ("max_steps", "settle_steps", "env_seed", "camera_size")


def protocol_differences(df: pd.DataFrame, baseline: str, candidate: str) -> list[str]:
    """'max_steps 300 vs 520' for each protocol setting the two runs' manifests disagree on."""
    differ = []
    for name in PROTOCOL_FIELDS:
        column = f"protocol.{name}"
        if column not in df:
            continue
        a, b = (df.loc[df["run_id"] == run, column].dropna().unique() for run in (baseline, candidate))
        if len(a) and len(b) and set(a) != set(b):
            differ.append(f"{name} {', '.join(map(str, a))} vs {', '.join(map(str, b))}")
    return differ


def paired_comparison(df: pd.DataFrame, baseline: str, candidate: str) -> PairedComparison:
    """Pair episodes on (suite, task, init state); pairs with an error on either side are left out."""
    judged = df[df["outcome"] != "error"]
    cols = ["key", "outcome"]
    a = judged[judged["run_id"] == baseline][cols]
    b = judged[judged["run_id"] == candidate][cols]
    merged = a.merge(b, on="key", suffixes=("_a", "_b"))
    sa = merged["outcome_a"] == "success"
    sb = merged["outcome_b"] == "success"
    only_a, only_b = int((sa & ~sb).sum()), int((~sa & sb).sum())
    return PairedComparison(
        baseline, candidate, len(merged), int(sa.sum()), int(sb.sum()), only_a, only_b, mcnemar_exact(only_a, only_b)
    )


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def presentable(table: pd.DataFrame) -> pd.DataFrame:
    """Rates as percentages with the interval in one column, for people to read."""
    out = table.copy()
    out["success_%"] = ["" if math.isnan(r) else f"{100 * r:.1f}" for r in out["success_rate"]]
    out["ci95_%"] = [
        "" if math.isnan(lo) else f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in zip(out["ci95_low"], out["ci95_high"])
    ]
    out = out.drop(columns=["success_rate", "ci95_low", "ci95_high"])
    first = ["run", "policy", "suite", "task", "episodes", "success_%", "ci95_%", "errors"]
    return out[first + [c for c in out.columns if c not in first]]


# The four suites whose mean a published "average" row gives.
LIBERO_FOUR = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def published_rows(published: pd.DataFrame, suites) -> pd.DataFrame:
    """The published rows for the given suites; the averages only when all four are there."""
    suites = set(suites)
    wanted = suites | ({AVERAGE} if set(LIBERO_FOUR) <= suites else set())
    rows = published[published["suite"].isin(wanted)].copy()
    rows["visual_tokens"] = ["" if math.isnan(v) else f"{v:g}" for v in rows["visual_tokens"]]
    rows["success_pct"] = [f"{v:.1f}" for v in rows["success_pct"]]
    return rows.rename(columns={"success_pct": "success_%"})


def markdown_report(df: pd.DataFrame, published: pd.DataFrame | None = None, by_task: bool = True) -> str:
    """The runs' tables; with ``published``, the published rows for their suites in a section
    of their own, never in the runs' tables; without ``by_task``, one row per run and suite."""
    table = presentable(success_table(df))
    if not by_task:
        table = table[table["task"] == ALL_TASKS].drop(columns="task")
    title = "## Success by task and suite" if by_task else "## Success by suite"
    parts = [title, "", to_markdown(table)]
    runs = list(dict.fromkeys(df["run_id"]))
    if len(runs) > 1:
        parts += ["", f"## Paired episodes (baseline: {runs[0]})", ""]
        rows = []
        for other in runs[1:]:
            cmp = paired_comparison(df, runs[0], other)
            differ = protocol_differences(df, runs[0], other)
            # Runs of other suites or init states share no episode, and runs under another
            # protocol share keys but not episodes: nothing to compare.
            paired = cmp.pairs > 0 and not differ
            rows.append({
                "candidate": other, "pairs": cmp.pairs, "baseline_success": cmp.baseline_success,
                "candidate_success": cmp.candidate_success, "only_baseline": cmp.only_baseline,
                "only_candidate": cmp.only_candidate, "drop_points": round(cmp.drop_points, 2) if paired else "n/a",
                "mcnemar_p": cmp.p_value if paired else "n/a",
                "protocol": "; ".join(differ) if differ else "same",
            })
        parts.append(to_markdown(pd.DataFrame(rows)))
    if "policy_caveat" in df:
        caveats = df.dropna(subset=["policy_caveat"]).drop_duplicates("run_id")
        if not caveats.empty:
            parts += ["", "## Caveats", ""]
            parts += [f"- {r.run_id} ({r.policy}): {r.policy_caveat}" for r in caveats.itertuples()]
    if published is not None:
        rows = published_rows(published, df["suite"].unique())
        parts += ["", "## Published elsewhere (not measured by these runs)", ""]
        if rows.empty:
            parts.append("No published rows for these suites.")
        else:
            parts += [
                "Other models, checkpoints, hardware and episode counts: read beside the tables "
                "above, not as rows of them.", "", to_markdown(rows),
            ]
    if "retried_errors" in df:
        retried = df.drop_duplicates("run_id").query("retried_errors > 0")
        if not retried.empty:
            parts += ["", "## Errors run again", ""]
            parts += [f"- {r.run_id}: {r.retried_errors} episode(s) that ended as errors were run again "
                      f"(`--retry-errors`; their first records are in {RETRIED_ERRORS})" for r in retried.itertuples()]
    errors = df[df["outcome"] == "error"]
    if not errors.empty:
        parts += ["", f"## Errors ({len(errors)}; not counted as failures)", ""]
        parts += [f"- {r.run_id} {r.key}: {r.error}" for r in errors.itertuples()]
    return "\n".join(parts)
