"""Regression gate: does a candidate run do worse than a baseline run?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report import paired_comparison, pooled_latencies, protocol_differences


@dataclass
class Verdict:
    regressed: bool
    lines: list[str]


def compare_runs(df: pd.DataFrame, baseline: str, candidate: str, max_drop: float, alpha: float = 0.05) -> Verdict:
    """Regressed if success drops by more than ``max_drop`` points on the paired episodes,
    if the paired drop is significant (exact McNemar, two-sided, at ``alpha``), or if the
    candidate has more errors than the baseline on the episodes both ran."""
    differ = protocol_differences(df, baseline, candidate)
    if differ:
        return Verdict(True, [f"REGRESSION CHECK REFUSED: {baseline} and {candidate} ran under different protocols "
                              f"({'; '.join(differ)}), so their episodes are not comparable"])
    cmp = paired_comparison(df, baseline, candidate)
    if cmp.pairs == 0:
        return Verdict(True, [f"REGRESSION CHECK IMPOSSIBLE: {baseline} and {candidate} share no judged episode "
                              "(same suite, task and init state, neither an error)"])
    base_rate = 100.0 * cmp.baseline_success / cmp.pairs
    cand_rate = 100.0 * cmp.candidate_success / cmp.pairs
    lines = [
        f"paired episodes: {cmp.pairs}",
        f"baseline success: {cmp.baseline_success}/{cmp.pairs} = {base_rate:.1f}%",
        f"candidate success: {cmp.candidate_success}/{cmp.pairs} = {cand_rate:.1f}%",
        f"discordant pairs: baseline-only {cmp.only_baseline}, candidate-only {cmp.only_candidate}; "
        f"exact McNemar p = {cmp.p_value:.4g}",
    ]
    lines += cost_lines(df, baseline, candidate)
    a, b = (df[df["run_id"] == run].set_index("key")["outcome"] for run in (baseline, candidate))
    shared = a.index.intersection(b.index)
    errors_a, errors_b = int((a[shared] == "error").sum()), int((b[shared] == "error").sum())
    unpaired = len(a.index.symmetric_difference(b.index))
    if errors_a or errors_b or unpaired:
        lines.append(f"left out: episodes with an error in baseline {errors_a}, in candidate {errors_b}; "
                     f"episodes in one run only {unpaired}")
    regressed = False
    if errors_b > errors_a:
        # Errors are not failures, but a gate blind to them would pass a candidate that errs
        # wherever it would fail.
        regressed = True
        lines.append(f"REGRESSION: the candidate has more errors ({errors_b}) than the baseline ({errors_a}) "
                     "on the episodes both ran")
    if cmp.drop_points > max_drop:
        regressed = True
        lines.append(f"REGRESSION: success dropped by {cmp.drop_points:.1f} points, more than the allowed {max_drop:g}")
    if cmp.p_value < alpha and cmp.only_baseline > cmp.only_candidate:
        regressed = True
        lines.append(f"REGRESSION: the drop is significant on the paired episodes (p = {cmp.p_value:.4g} < {alpha:g})")
    if not regressed:
        lines.append(f"OK: drop {cmp.drop_points:.1f} points (allowed {max_drop:g}), not significant at {alpha:g}")
    return Verdict(regressed, lines)


# Per-query figures a policy reports that say what a query costs: compared, never judged.
COST_STATS = (("tflops", "TFLOPs", "{:.4g}"), ("visual_tokens", "visual tokens", "{:.1f}"))


def cost_lines(df: pd.DataFrame, baseline: str, candidate: str) -> list[str]:
    """What a query cost in each run, over the episodes both judged: per-query means of the
    policy's cost figures (weighted by each episode's queries) and the latency median."""
    judged = df[df["outcome"] != "error"]
    runs = [judged[judged["run_id"] == run] for run in (baseline, candidate)]
    shared = set(runs[0]["key"]) & set(runs[1]["key"])
    runs = [r[r["key"].isin(shared)] for r in runs]
    parts = []
    for stat, label, fmt in COST_STATS:
        column = f"stats.{stat}"
        if all(column in r and r[column].notna().all() and r["queries"].sum() > 0 for r in runs):
            a, b = (float(np.average(r[column], weights=r["queries"])) for r in runs)
            ratio = f" ({b / a:.3f}x)" if a else ""
            parts.append(f"{label} {fmt.format(a)} -> {fmt.format(b)}{ratio}")
    latencies = [pooled_latencies(r) for r in runs]
    if all(latencies):
        a, b = (float(np.median(lat)) for lat in latencies)
        parts.append(f"latency p50 {a:.3g} -> {b:.3g} ms" + (f" ({b / a:.3f}x)" if a else ""))
    return [f"cost per query, baseline -> candidate: {'; '.join(parts)}"] if parts else []
