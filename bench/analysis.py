"""Results as a pandas DataFrame: one row per episode, the run's manifest fields as columns.

    from bench.analysis import load_results
    df = load_results("results/*")
    df.groupby(["policy", "suite"]).success.mean()

Success rates published by others are in ``load_published()``, a separate frame: they were
measured elsewhere, often on another base model, and are never rows of our results.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pandas as pd

from bench.records import MANIFEST, read_episodes, read_manifest

PUBLISHED = Path(__file__).with_name("published.csv")
PUBLISHED_COLUMNS = ("method", "base_model", "suite", "success_pct", "visual_tokens", "source", "note")
AVERAGE = "average"  # a published row for the mean over the four LIBERO suites


def find_run_dirs(spec: str | Path) -> list[Path]:
    """A run directory, a directory of run directories, or a glob of either."""
    matches = sorted(glob.glob(str(spec))) or [str(spec)]
    runs: list[Path] = []
    for match in map(Path, matches):
        if (match / MANIFEST).is_file():
            runs.append(match)
        elif match.is_dir():
            runs.extend(sorted(p.parent for p in match.glob(f"*/{MANIFEST}")))
    if not runs:
        raise FileNotFoundError(f"no run directory (with {MANIFEST}) found at {spec}")
    return runs


def _flatten(prefix: str, data: dict) -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(f"{name}.", value))
        else:
            flat[name] = value
    return flat


def policy_label(config: dict) -> str:
    """The policy with its options, as reports show it: ``fastv k=2 r=0.5 checkpoint=ckpt-dir``."""
    args = config.get("policy_args") or {}
    shown = [f"{k}={Path(v).name if k == 'checkpoint' else v}" for k, v in sorted(args.items()) if k != "device"]
    return " ".join([config["policy"], *shown])


def answering_policy(manifest: dict) -> tuple[str, str]:
    """(name, label) of the policy that answered the run's queries: for ``remote``, the one its
    server served (``lightvla keep=78 (served)``)."""
    served = (manifest.get("policy_provenance") or {}).get("served")
    if served is None:
        return manifest["config"]["policy"], policy_label(manifest["config"])
    return served["policy"], policy_label(served) + " (served)"


def run_frame(run_dir: Path) -> pd.DataFrame:
    manifest = read_manifest(run_dir)
    rows = []
    policy, label = answering_policy(manifest)
    run_fields = {
        "run_id": Path(run_dir).resolve().name,  # where the run is now: a copied or moved run is its own
        "run_dir": str(run_dir),
        "policy": policy,
        "policy_label": label,
        "policy_caveat": manifest.get("policy_caveat"),
        # Episodes that ended as errors and were run again (their first records are in retried_errors.jsonl).
        "retried_errors": sum(len(r.get("retried_errors", [])) for r in manifest.get("resumes", [])),
        **_flatten("config.", manifest["config"]),
        **_flatten("protocol.", manifest.get("protocol", {})),
        **_flatten("versions.", manifest.get("versions", {})),
        **_flatten("code.", manifest.get("code", {})),
        "host": manifest.get("host", {}).get("hostname"),
        "started_at": manifest.get("started_at"),
    }
    for record in read_episodes(run_dir):
        row = {k: v for k, v in record.items() if not isinstance(v, dict)}
        row.update(_flatten("latency_ms.", record.get("latency_ms") or {}))
        row.update(_flatten("stats.", record.get("policy_stats") or {}))
        row.update(run_fields)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        # 1.0 / 0.0, and NaN for errors, so that .mean() is the success rate over judged episodes.
        frame["success"] = frame["outcome"].map({"success": 1.0, "failure": 0.0})
    return frame


def load_results(spec: str | Path) -> pd.DataFrame:
    frames = [run_frame(run) for run in find_run_dirs(spec)]
    frames = [f for f in frames if not f.empty]
    return distinct_runs(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()


def distinct_runs(df):
    """Each run directory once (one named twice, or inside a directory also named, would count
    its episodes twice), and a distinct run_id for each: directories of one name in different
    places are told apart by their paths below the folder they share."""
    df = df.assign(run_dir=[str(Path(d).resolve()) for d in df["run_dir"]])
    df = df.drop_duplicates(subset=["run_dir", "key"], ignore_index=True)
    dirs = df.drop_duplicates("run_dir")[["run_dir", "run_id"]]
    rename = {}
    for run_id, same in dirs.groupby("run_id"):
        if len(same) > 1:
            common = os.path.commonpath(list(same["run_dir"]))
            rename.update({d: os.path.relpath(d, common) for d in same["run_dir"]})
    df["run_id"] = [rename.get(d, r) for d, r in zip(df["run_dir"], df["run_id"])]
    return df


def load_published(path: str | Path = PUBLISHED) -> pd.DataFrame:
    """Published success rates, one row per (method, source, suite), with their base model.

    A malformed file is refused, naming the row, rather than read into wrong comparisons."""
    from suites.registry import SUITES

    table = pd.read_csv(path, dtype={"note": str}, keep_default_na=False, na_values={"visual_tokens": [""]})
    missing = [c for c in PUBLISHED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for line, row in zip(range(2, len(table) + 2), table.itertuples()):
        if row.suite not in SUITES and row.suite != AVERAGE:
            raise ValueError(f"{path}, line {line}: unknown suite {row.suite!r}")
        if not 0.0 <= pd.to_numeric(row.success_pct, errors="coerce") <= 100.0:
            raise ValueError(f"{path}, line {line}: success_pct {row.success_pct} is not a percentage")
        if not (row.method and row.base_model and row.source):
            raise ValueError(f"{path}, line {line}: method, base_model and source are required")
    table["success_pct"] = table["success_pct"].astype(float)
    table["visual_tokens"] = pd.to_numeric(table["visual_tokens"], errors="raise")
    return table[list(PUBLISHED_COLUMNS)]


def load_finetune_logs(spec: str | Path) -> pd.DataFrame:
    """The logs of ``bench finetune`` runs, one row per logged step: training lines (loss, lr,
    step_ms, LightVLA's noise_scale and selected_tokens) and validation lines (val_loss,
    val_visual_tokens) of the same step side by side, with the run's policy and directory."""
    import json

    from bench.finetune import LOG

    frames = []
    for run in find_run_dirs(spec):
        if not (run / LOG).is_file():
            continue  # an evaluation run
        manifest = read_manifest(run)
        lines = [json.loads(line) for line in (run / LOG).read_text().splitlines() if line.strip()]

        def lines_with(key: str) -> pd.DataFrame:
            rows = [e for e in lines if key in e]
            return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["step", key])

        frame = lines_with("loss").merge(lines_with("val_loss"), on="step", how="outer")
        frame = frame.sort_values("step", ignore_index=True)
        frames.append(frame.assign(run_dir=str(run), run_id=run.name, policy=manifest["config"]["policy"]))
    if not frames:
        raise FileNotFoundError(f"no fine-tuning run (with {LOG}) found at {spec}")
    return pd.concat(frames, ignore_index=True)
