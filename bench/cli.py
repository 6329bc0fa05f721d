"""The ``bench`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.argtypes import NON_NEGATIVE, POSITIVE, key_value, positive_seconds

DEFAULT_POLICY = "scripted"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="LIBERO benchmark harness for VLA policies")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run episodes and record them")
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="settings from a YAML or JSON file (or a run's manifest.json); flags given override them")
    run.add_argument("--suite", help="libero_spatial, libero_object, libero_goal, libero_10 (libero_long), libero_90")
    run.add_argument("--policy", help=f"policy name (default {DEFAULT_POLICY}; see 'bench list policies'), or module.path:ClassName")
    _policy_options(run)
    run.add_argument("--tasks", help="task indices, e.g. 0,3 or 0-4 (default: all)")
    sel = run.add_mutually_exclusive_group()
    sel.add_argument("--episodes-per-task", type=POSITIVE, help="use the first N init states of each task (default 50)")
    sel.add_argument("--init-states", help="init state indices, e.g. 0,7,12")
    run.add_argument("--seed", type=int, help="policy seed (default 0); the env seed is fixed by the protocol")
    run.add_argument("--chunk-length", type=POSITIVE,
                     help="execute the first K actions of each chunk (default: the policy's)")
    run.add_argument("--max-steps", type=POSITIVE, help="override the suite's step budget (smoke tests only)")
    run.add_argument("--watchdog", type=positive_seconds, dest="watchdog_s", help="wall-clock seconds per episode (default 900)")
    run.add_argument("--video", action="store_true", default=None,
                     help="write an MP4 per episode (rendering both cameras at every step)")
    run.add_argument("--workers", type=POSITIVE, help=f"env worker processes (default: the {os.cpu_count()} cores)")
    run.add_argument("--max-batch", type=NON_NEGATIVE, help="most observations per policy call (default, or 0: one per worker)")
    run.add_argument("--out", type=Path, help="run directory (default results/<suite>_<policy>_<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    run.add_argument("--retry-errors", action="store_true",
                     help="with --resume: run again the episodes recorded as errors (their records move to "
                          "retried_errors.jsonl)")
    run.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    rec = sub.add_parser("record-demos", help="record a policy's successful episodes as LIBERO-style HDF5")
    rec.add_argument("--suite", required=True)
    rec.add_argument("--policy", default="scripted")
    rec.add_argument("--policy-arg", action="append", type=key_value, metavar="KEY=VALUE")
    rec.add_argument("--tasks")
    rsel = rec.add_mutually_exclusive_group()
    rsel.add_argument("--episodes-per-task", type=POSITIVE)
    rsel.add_argument("--init-states")
    rec.add_argument("--image-size", type=POSITIVE, default=128, help="camera images are rendered at this size")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--max-steps", type=POSITIVE)
    rec.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    rec.add_argument("--resume", action="store_true",
                     help="continue --out: run only the episodes it does not hold or record as failed")
    rec.add_argument("--workers", type=POSITIVE, default=1,
                     help="env worker processes (default 1); the file numbers its demonstrations by task and init state")
    rec.add_argument("--no-progress", action="store_true")

    reg = sub.add_parser("regenerate-demos", help="replay LIBERO's own demonstration files into training files, "
                         "as OpenVLA-OFT made its LIBERO datasets")
    reg.add_argument("--suite", required=True)
    reg.add_argument("--source", nargs="+", type=Path, required=True, metavar="PATH",
                     help="LIBERO's <task name>_demo.hdf5 files, or directories of them")
    reg.add_argument("--out", type=Path, required=True, help="HDF5 file to write (bench record-demos' layout)")
    reg.add_argument("--tasks", help="task indices (default: every task with a file)")
    reg.add_argument("--demos-per-task", type=POSITIVE, help="the first N demonstrations of each file (default all)")
    reg.add_argument("--image-size", type=POSITIVE, default=256, help="camera images are rendered at this size (OFT: 256)")
    reg.add_argument("--keep-noops", action="store_true",
                     help="replay and record no-op actions too (OFT skips them: neither executed nor recorded)")
    reg.add_argument("--resume", action="store_true", help="continue --out: replay only what it does not settle yet")
    reg.add_argument("--workers", type=POSITIVE, default=1,
                     help="env worker processes (default 1); the file numbers its demonstrations by task and source demonstration")
    reg.add_argument("--no-progress", action="store_true")

    imp = sub.add_parser("import-rlds", help="OpenVLA-OFT's LIBERO RLDS datasets as a demonstration file "
                         "(read without TensorFlow)")
    imp.add_argument("--source", type=Path, required=True,
                     help="the dataset's version directory, e.g. modified_libero_rlds/libero_spatial_no_noops/1.0.0")
    imp.add_argument("--out", type=Path, required=True, help="HDF5 file to write (bench record-demos' layout)")
    imp.add_argument("--suite", help="the dataset's suite (default: from its name, <suite>_no_noops)")
    imp.add_argument("--no-progress", action="store_true")

    ft = sub.add_parser("finetune", help="fine-tune oft, lightvla or lightvla_star on demonstration files (LoRA)")
    ft.add_argument("--demos", nargs="+", type=Path, metavar="FILE",
                    help="HDF5 files written by bench record-demos")
    ft.add_argument("--out", type=Path, required=True, help="run directory; its checkpoint/ is the fine-tuned model")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out with its recorded settings")
    ft.add_argument("--policy", default="oft", help="oft, lightvla or lightvla_star (default oft)")
    _policy_options(ft)
    ft.add_argument("--steps", type=POSITIVE, default=1000, help="optimiser steps (default 1000)")
    ft.add_argument("--batch-size", type=POSITIVE, default=8,
                    help="samples per step, over all processes when torchrun starts several (default 8)")
    ft.add_argument("--grad-accumulation", type=POSITIVE, default=1,
                    help="split each process's share of a step into N micro-batches: the same step in less "
                         "memory (default 1)")
    ft.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4, as OFT)")
    ft.add_argument("--decay-at", type=NON_NEGATIVE, default=0,
                    help="divide the learning rate by 10 after this many steps (default 0: never)")
    ft.add_argument("--lr-warmup", type=NON_NEGATIVE, default=0,
                    help="raise the learning rate linearly from a tenth to --lr over this many steps, as OFT's "
                         "lr_warmup_steps (default 0: none)")
    ft.add_argument("--lora-rank", type=POSITIVE, default=32, help="LoRA rank (default 32)")
    ft.add_argument("--lora-alpha", type=float, default=0.0, help="LoRA alpha (default min(rank, 16))")
    ft.add_argument("--no-image-aug", action="store_true", help="train without image augmentation")
    ft.add_argument("--keep-noops", action="store_true", help="train on no-op steps too (OFT drops them)")
    ft.add_argument("--save-every", type=NON_NEGATIVE, default=0,
                    help="write the state and checkpoint every N steps too (default 0: at the end)")
    ft.add_argument("--keep-checkpoints", action="store_true",
                    help="keep every saved step's checkpoint as checkpoint-STEP (OFT's default; each holds the "
                         "whole merged model); checkpoint then links to the latest")
    ft.add_argument("--log-every", type=POSITIVE, default=10, help="steps per line of log.jsonl (default 10)")
    ft.add_argument("--val-demos", nargs="+", type=Path, default=[], metavar="FILE",
                    help="held-out demonstration files: L1 loss as evaluation queries the model (LightVLA: "
                         "its inference selection) at the end, and every --val-every steps")
    ft.add_argument("--val-every", type=NON_NEGATIVE, default=0, help="validate every N steps too (default 0)")
    ft.add_argument("--val-samples", type=POSITIVE, default=256,
                    help="held-out samples, spread evenly over them (default 256)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--no-progress", action="store_true")

    spd = sub.add_parser("speed", help="time the same episodes: reference loop, render on demand, worker pool")
    spd.add_argument("--suite", default="libero_spatial")
    spd.add_argument("--tasks", type=POSITIVE, default=2, help="the first T tasks")
    spd.add_argument("--episodes-per-task", type=POSITIVE, default=2)
    spd.add_argument("--workers", type=POSITIVE, default=os.cpu_count() or 1)
    spd.add_argument("--chunk-length", type=POSITIVE, default=8)
    spd.add_argument("--json", action="store_true")

    prof = sub.add_parser("profile", help="FLOPs, parameters, latency and memory of one policy query")
    prof.add_argument("--policy", default="oft")
    prof.add_argument("--policy-arg", action="append", type=key_value, metavar="KEY=VALUE",
                      help="policy option, repeatable (e.g. k=2, r=0.5)")
    prof.add_argument("--keep", type=POSITIVE, help="force the visual tokens a pruning policy keeps (random weights "
                      "cannot show a learned count); sparsevlm's budget, a mean over the LLM layers")
    prof.add_argument("--sweep", action="store_true", help="every method in one table, relative to OFT")
    prof.add_argument("--size", default="full", choices=["full", "tiny"])
    prof.add_argument("--device", default="meta", help="meta (FLOPs only, no memory), cpu, cuda")
    prof.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU and meta, float32 on CPU")
    prof.add_argument("--batch", type=POSITIVE, default=1)
    prof.add_argument("--prompt-tokens", type=POSITIVE, help="prompt length incl. BOS and the empty piece "
                      "(default: 29, the LIBERO mean)")
    prof.add_argument("--repeats", type=POSITIVE, default=20, help="timed queries")
    prof.add_argument("--warmup", type=NON_NEGATIVE, default=3, help="untimed queries first")
    prof.add_argument("--no-yardstick", action="store_true", help="skip timing transformers' LlamaModel")
    prof.add_argument("--no-cuda-graphs", action="store_true",
                      help="time eager queries only (by default a GPU replays CUDA graphs and eager is timed too)")
    prof.add_argument("--speedups", default="auto", metavar="NAMES",
                      help="auto (default: every one a GPU can use, none on a CPU), none, all, or comma-separated: "
                           "compile_kernels (the LLM's element-wise chains compiled by "
                           "torch.compile), compile_towers (every vision block compiled), parallel_towers (the two "
                           "towers on two CUDA streams), fuse_gate_up (the MLP's gate and up as one product below "
                           "300 tokens)")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON result to FILE")

    lst = sub.add_parser("list", help="list suites, tasks or policies")
    lst.add_argument("what", choices=["suites", "tasks", "policies"])
    lst.add_argument("--suite", help="suite for 'list tasks'")

    rep = sub.add_parser("report", help="tables from run directories")
    rep.add_argument("runs", nargs="+", help="run directories (or globs)")
    rep.add_argument("--csv", type=Path, help="also write the table as CSV to this file ('-' for stdout only)")
    rep.add_argument("--suites-only", action="store_true",
                     help="one row per run and suite (each suite's pooled episodes), no row per task")
    rep.add_argument("--published", action="store_true",
                     help="also list the success rates published elsewhere for the runs' suites, apart")

    srv = sub.add_parser("serve", help="answer 'remote' policies over TCP with a policy on this machine")
    srv.add_argument("--policy", required=True, help="policy name; see 'bench list policies'")
    _policy_options(srv)
    srv.add_argument("--seed", type=int, default=0,
                     help="policy seed (default 0): what the policy draws once (random weights); each episode's "
                          "seed comes from the run")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 for every network: then use --token-file "
                          "and TLS)")
    srv.add_argument("--port", type=NON_NEGATIVE, default=8765, help="port (default 8765; 0 picks a free one)")
    srv.add_argument("--token-file", help="answer only clients that give the secret in this file "
                     "(--policy-arg token_file=FILE on their side)")
    srv.add_argument("--tls-cert", help="serve TLS with this certificate (PEM; clients: --policy-arg tls_ca=FILE)")
    srv.add_argument("--tls-key", help="the certificate's private key (PEM)")
    srv.add_argument("--max-batch", type=NON_NEGATIVE, default=0,
                     help="most observations per policy call when clients' queries wait together (default, or 0: "
                          "all that wait)")

    cmp = sub.add_parser("compare", help="exit non-zero if CANDIDATE regresses against BASELINE")
    cmp.add_argument("baseline")
    cmp.add_argument("candidate")
    cmp.add_argument("--max-drop", type=float, required=True, help="allowed drop in success, percentage points")
    cmp.add_argument("--alpha", type=float, default=0.05, help="significance level of the McNemar test")
    return parser


def _policy_options(parser) -> None:
    """The policy's options, as ``bench run`` and ``bench serve`` take them."""
    parser.add_argument("--policy-arg", action="append", type=key_value, metavar="KEY=VALUE",
                        help="policy option, repeatable")
    parser.add_argument("--checkpoint", help="model checkpoint directory, or a Hugging Face Hub repository id found "
                        "in the local Hub cache (same as --policy-arg checkpoint=DIR)")
    parser.add_argument("--unnorm-key", help="dataset statistics entry of the checkpoint (policy option unnorm_key)")
    parser.add_argument("--device", help="model device: auto, cpu, cuda (policy option device)")
    parser.add_argument("--action-slice", choices=("train", "release"),
                        help="hidden states fed to the action head: train (OFT's, the default) or release (the last "
                             "56, as LightVLA's public code reads them) (policy option action_slice)")


def _policy_args(args) -> dict[str, str]:
    """``--policy-arg`` options with those given by flags of their own."""
    policy_args = dict(args.policy_arg or [])
    for option, value in (("checkpoint", args.checkpoint), ("unnorm_key", args.unnorm_key), ("device", args.device),
                          ("action_slice", args.action_slice)):
        if value is not None:
            policy_args[option] = value
    return policy_args


def _config_from_args(args):
    from bench.config import RunConfig
    from bench.config_file import read_config_file
    from bench.plan import parse_index_list
    from bench.records import read_manifest

    policy_args = _policy_args(args)
    given = {
        "suite": args.suite,
        "policy": args.policy,
        "policy_args": policy_args or None,
        "tasks": parse_index_list(args.tasks, "task"),
        "episodes_per_task": args.episodes_per_task,
        "init_states": parse_index_list(args.init_states, "init state"),
        "seed": args.seed,
        "chunk_length": args.chunk_length,
        "max_steps": args.max_steps,
        "watchdog_s": args.watchdog_s,
        "video": args.video,
        "workers": args.workers,
        "max_batch": args.max_batch,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume:
        if args.config:
            raise ValueError("--config and --resume: a resumed run keeps its recorded settings")
        # Settings not given again are those recorded; settings given again must match them.
        return RunConfig.from_dict(_given_over(read_manifest(args.resume)["config"], given))
    if args.config:
        given = _given_over(read_config_file(args.config), given)
    if "suite" not in given:
        raise ValueError("--suite is required (or --resume DIR, or a config file that names it)")
    given.setdefault("policy", DEFAULT_POLICY)
    given.setdefault("workers", os.cpu_count() or 1)
    return RunConfig(**given)


def _given_over(base: dict, given: dict) -> dict:
    """Settings given on the command line over those of a file or a recorded run."""
    if "episodes_per_task" in given or "init_states" in given:  # one episode selection replaces the other
        base = {**base, "episodes_per_task": None, "init_states": None}
    if "policy_args" in given:  # options given join the base's
        given = {**given, "policy_args": {**(base.get("policy_args") or {}), **given["policy_args"]}}
    return {**base, **given}


def cmd_run(args) -> int:
    from bench.report import markdown_report
    from bench.analysis import load_results
    from bench.runner import default_run_dir, execute

    if args.resume and args.out and args.out != args.resume:
        raise ValueError("--out and --resume name different directories; give one")
    config = _config_from_args(args)
    run_dir = args.resume or args.out or default_run_dir(config)
    summary = execute(config, run_dir, resume=bool(args.resume), progress=not args.no_progress,
                      retry_errors=args.retry_errors)
    df = load_results(summary.run_dir)
    if args.json:
        judged = summary.outcomes["success"] + summary.outcomes["failure"]
        print(json.dumps({
            "run_dir": str(summary.run_dir),
            "suite": config.suite,
            "policy": config.policy,
            "planned": summary.planned,
            "recorded": summary.recorded,
            "ran_now": summary.ran_now,
            "outcomes": summary.outcomes,
            "success_rate": summary.outcomes["success"] / judged if judged else None,
        }, indent=2))
    else:
        print(f"run directory: {summary.run_dir}")
        if not df.empty:
            print(markdown_report(df))
    return 0


def cmd_record_demos(args) -> int:
    from bench.plan import parse_index_list
    from bench.record import record_demos

    summary = record_demos(
        args.suite, args.out, args.policy, dict(args.policy_arg or []),
        tasks=parse_index_list(args.tasks, "task"), episodes_per_task=args.episodes_per_task,
        init_states=parse_index_list(args.init_states, "init state"), image_size=args.image_size,
        seed=args.seed, max_steps=args.max_steps, progress=not args.no_progress, resume=args.resume,
        workers=args.workers,
    )
    print(f"{summary.path}: recorded {summary.recorded} of {summary.attempted} episodes"
          + (f"; {summary.already_done} were settled before" if args.resume else ""))
    for key, why in summary.not_recorded.items():
        print(f"  not recorded {key}: {why}")
    return 0


RESUME_HINTS = {  # what continues an interrupted command
    "run": "bench run --resume DIR",
    "record-demos": "the same command with --resume",
    "regenerate-demos": "the same command with --resume",
    "finetune": "bench finetune --resume --out DIR (from its last saved state)",
}


def cmd_regenerate_demos(args) -> int:
    from bench.plan import parse_index_list
    from bench.regenerate import regenerate_demos

    summary = regenerate_demos(
        args.suite, args.source, args.out, tasks=parse_index_list(args.tasks, "task"),
        demos_per_task=args.demos_per_task, image_size=args.image_size, drop_noops=not args.keep_noops,
        resume=args.resume, progress=not args.no_progress, workers=args.workers,
    )
    print(f"{summary.path}: recorded {summary.recorded} of {summary.attempted} replays "
          f"({summary.skipped_noops} no-op actions skipped)"
          + (f"; {summary.already_done} were settled before" if args.resume else ""))
    for key, why in summary.not_recorded.items():
        print(f"  not recorded {key}: {why}")
    return 0


def cmd_import_rlds(args) -> int:
    from bench.rlds import import_rlds

    summary = import_rlds(args.source, args.out, args.suite, progress=not args.no_progress)
    print(f"{summary.path}: {summary.episodes} episodes, {summary.steps} steps of {summary.dataset}")
    return 0


def cmd_finetune(args) -> int:
    from bench.finetune import FinetuneConfig, finetune

    if args.resume:
        defaults = vars(build_parser().parse_args(["finetune", "--out", str(args.out), "--resume"]))
        given = sorted(k for k, v in vars(args).items() if k not in ("out", "resume", "no_progress") and v != defaults[k])
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"--resume continues with the run's recorded settings: leave out {flags}")
        config = None
    else:
        if not args.demos:
            raise ValueError("--demos is required (unless --resume continues a run)")
        config = FinetuneConfig(
            demos=[str(p) for p in args.demos], policy=args.policy, policy_args=_policy_args(args), steps=args.steps,
            batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, learning_rate=args.lr,
            decay_at=args.decay_at, lr_warmup=args.lr_warmup, lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha, image_aug=not args.no_image_aug, drop_noops=not args.keep_noops,
            save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
            seed=args.seed,
            val_demos=[str(p) for p in args.val_demos], val_every=args.val_every, val_samples=args.val_samples,
        )
    summary = finetune(config, args.out, resume=args.resume, progress=not args.no_progress)
    losses = "" if summary.first_loss is None else f"; L1 loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
    if summary.val_loss is not None:
        losses += f"; held out {summary.val_loss:.4f}"
    print(f"{summary.steps} steps on {summary.samples} samples{losses}")
    print(f"checkpoint: {summary.checkpoint}")
    return 0


def cmd_speed(args) -> int:
    from bench.speed import measure

    result = measure(args.suite, args.tasks, args.episodes_per_task, args.workers, args.chunk_length)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["same_outcomes"] else 1
    print(f"{result['episodes']} episodes of {result['suite']}, chunks of {result['chunk_length']}, "
          f"{result['workers']} workers")
    print("| loop | env steps/s | episodes/hour | wall s |\n|---|---|---|---|")
    for mode in ("reference", "serial", "pool"):
        print(f"| {mode} | {result['steps_per_s'][mode]} | {result['episodes_per_hour'][mode]} | "
              f"{result['wall_s'][mode]} |")
    print(f"serial/reference {result['ratio_serial']}x, pool/reference {result['ratio_pool']}x; "
          f"peak memory: {result['peak_rss_mb']}")
    print("same outcomes and steps in all three: " + ("yes" if result["same_outcomes"] else
                                                       f"NO: {result['mismatches']}"))
    return 0 if result["same_outcomes"] else 1


def cmd_profile(args) -> int:
    from bench.profile import DEFAULT_PROMPT_TOKENS, ProfileSettings, format_profile, format_sweep, profile, sweep

    settings = ProfileSettings(
        policy=args.policy, policy_args=dict(args.policy_arg or []), keep=args.keep, size=args.size, device=args.device, dtype=args.dtype, batch=args.batch,
        prompt_tokens=args.prompt_tokens or DEFAULT_PROMPT_TOKENS, repeats=args.repeats, warmup=args.warmup,
        yardstick=not args.no_yardstick, cuda_graphs=not args.no_cuda_graphs, speedups=args.speedups,
    )

    def save(result) -> None:
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(json.dumps(result, indent=2))

    if args.sweep:
        result = sweep(settings, on_row=save)  # saved row by row: a sweep cut short keeps its rows
        text = format_sweep(result)
    else:
        result = profile(settings)
        text = format_profile(result)
    save(result)
    print(json.dumps(result, indent=2) if args.json else text)
    return 1 if args.sweep and any("error" in r for r in result) else 0


def cmd_list(args) -> int:
    if args.what == "suites":
        from suites import list_suites

        print("| suite | aliases | tasks | max steps | settle steps |\n|---|---|---|---|---|")
        for s in list_suites():
            print(f"| {s.name} | {', '.join(s.aliases)} | {s.num_tasks} | {s.max_steps} | {s.settle_steps} |")
    elif args.what == "tasks":
        from suites import get_suite

        if not args.suite:
            raise ValueError("'bench list tasks' needs --suite")
        suite = get_suite(args.suite)
        print(f"{suite.name}: {suite.num_tasks} tasks, {suite.max_steps} max steps")
        for task in suite.tasks:
            print(f"{task.index:3d}  {task.instruction}")
    else:
        from policies import list_policies

        policies = list_policies()
        width = max(len(name) for name, _ in policies)
        for name, summary in policies:
            print(f"{name:{width}s}  {summary}")
    return 0


def cmd_report(args) -> int:
    import pandas as pd

    from bench.analysis import distinct_runs, load_published, load_results
    from bench.report import markdown_report, success_table

    frames = [f for f in (load_results(spec) for spec in args.runs) if not f.empty]
    if not frames:
        raise ValueError("the run directories hold no recorded episodes yet")
    df = distinct_runs(pd.concat(frames, ignore_index=True))
    print(markdown_report(df, load_published() if args.published else None, by_task=not args.suites_only))
    if args.csv:
        table = success_table(df)
        if str(args.csv) == "-":
            table.to_csv(sys.stdout, index=False)
        else:
            table.to_csv(args.csv, index=False)
    return 0


def cmd_serve(args) -> int:
    import logging
    import socket

    from bench.analysis import policy_label
    from bench.serve import PolicyServer, serve, server_tls
    from policies import make_policy
    from policies.remote import read_token

    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    tls = server_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
    token = read_token(args.token_file) if args.token_file else None
    policy_args = _policy_args(args)
    policy = make_policy(args.policy, policy_args, seed=args.seed)
    label = policy_label({"policy": args.policy, "policy_args": policy_args})

    def ready(address) -> None:
        host, port = address
        # Listening on every network: clients elsewhere reach it by this machine's name.
        reach = socket.gethostname() if host in ("0.0.0.0", "::") else host
        extra = (" --policy-arg token_file=FILE" if token else "") + (" --policy-arg tls_ca=CERT" if tls else "")
        print(f"serving {label} on {host}:{port}{' (TLS)' if tls else ''}; clients: bench run --policy remote "
              f"--policy-arg address={reach}:{port}{extra} (Ctrl-C stops)", flush=True)
        if token is None and host not in ("127.0.0.1", "::1", "localhost"):
            print("without --token-file any client that reaches this port can use the policy", flush=True)

    try:
        serve(PolicyServer(policy, policy_args, args.max_batch, token), args.host, args.port, on_ready=ready, tls=tls)
    except KeyboardInterrupt:
        print("\nbench: server stopped", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    import pandas as pd

    from bench.analysis import load_results, find_run_dirs
    from bench.compare import compare_runs

    dirs = [find_run_dirs(args.baseline), find_run_dirs(args.candidate)]
    for spec, found in zip((args.baseline, args.candidate), dirs):
        if len(found) != 1:
            raise ValueError(f"{spec} must name exactly one run directory, found {len(found)}")
    ids = [d[0].name for d in dirs]
    if ids[0] == ids[1]:
        ids = [ids[0] + " (baseline)", ids[1] + " (candidate)"]
    frames = [load_results(d[0]) for d in dirs]
    for spec, frame in zip((args.baseline, args.candidate), frames):
        if frame.empty:
            raise ValueError(f"{spec} holds no recorded episodes yet")
    # Labelled by side, not by name: a run compared with a copy of itself, or with itself, pairs up.
    df = pd.concat([frame.assign(run_id=label) for frame, label in zip(frames, ids)], ignore_index=True)
    verdict = compare_runs(df, ids[0], ids[1], args.max_drop, args.alpha)
    print("\n".join(verdict.lines))
    return 1 if verdict.regressed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "record-demos": cmd_record_demos, "regenerate-demos": cmd_regenerate_demos,
                "import-rlds": cmd_import_rlds,
                "finetune": cmd_finetune, "speed": cmd_speed, "profile": cmd_profile, "list": cmd_list,
                "report": cmd_report, "compare": cmd_compare, "serve": cmd_serve}
    from bench.pool import PoolStartError
    from bench.records import RunDirError
    from policies.base import PolicyOptionError

    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # output piped into head and the like
        return 0
    except (ValueError, OSError, RunDirError, PolicyOptionError, PoolStartError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)  # OSError: a path that cannot be written or read
        return 2
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command)
        print("\nbench: interrupted" + (f"; what was recorded is kept. Continue with: {hint}" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
