"""`align-jax train CONFIG [key.sub=value ...] [--resume]` and
`align-jax plan CONFIG --topology NAME` — the command-line entry point.

Also `python -m align_jax …`. Problems with the config or the data are reported in one line
naming the file, key, row or column, with exit status 2; a run stopped by a non-finite loss or
gradient in one line with exit status 1 (its last checkpoint resumes); `plan` exits with 3 when the
run does not fit.
"""

from __future__ import annotations

from align_jax.hostmem import retain_freed_memory

# before the imports below start threads: each step reuses its host memory (hostmem)
retain_freed_memory()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from align_jax.config import ConfigError, load_config, to_yaml  # noqa: E402
from align_jax.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align-jax",
                                     description="Align language models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="run a training job (sft, reward, dpo, kto, grpo, ppo)")
    run.add_argument("config", help="a YAML file, e.g. configs/sft_arithmetic.yaml")
    run.add_argument("overrides", nargs="*",
                     help="dotted overrides, e.g. train.lr=1e-5 train.steps=50")
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in out_dir")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    run.add_argument("--distributed", action="store_true",
                     help="join a multi-host run with jax.distributed.initialize() (auto-detected "
                          "on TPU pods, SLURM and Open MPI; elsewhere set JAX_COORDINATOR_ADDRESS, "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID); run the same command on every "
                          "host")
    plan = commands.add_parser("plan", help="compile a run ahead of time for a TPU topology: "
                                             "memory, FLOPs, roofline step time (exit 0 fits, 3 "
                                             "does not fit, 2 config error)")
    plan.add_argument("config",
                      help="a YAML file; model.path may be a directory holding only config.json")
    plan.add_argument("overrides", nargs="*",
                      help="dotted overrides, e.g. mesh.fsdp=4 model.remat=true")
    plan.add_argument("--topology", required=True,
                      help="a TPU topology libtpu accepts: v5e:2x2, v5p:2x2x2, v6e:2x4, …")
    plan.add_argument("--json", metavar="FILE", help="also write the plan as one JSON object")
    args, rest = parser.parse_known_args(argv)  # overrides may also follow the options
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":
            return run_plan(cfg, args.topology, args.json)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        import jax

        from align_jax.train import (  # imports JAX; kept out of --help and --print-config
            NonFiniteError,
            train,
        )

        if args.distributed:
            env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                       ("process_id", "JAX_PROCESS_ID"))
                   if v in os.environ}
            jax.distributed.initialize(**env)
        try:
            metrics = train(cfg, resume=args.resume)
        except NonFiniteError as e:
            print(f"align-jax: stopped: {e}", file=sys.stderr)
            return 1
    except (ConfigError, DataError) as e:
        print(f"align-jax: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1))
    return 0


def run_plan(cfg, topology: str, json_path: str | None) -> int:
    """Print the plan (and write it as JSON); 0 when every program fits, else 3 with what to
    change."""
    from align_jax import plan

    result = plan.plan(cfg, topology)
    print(plan.format_plan(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    if result.fits:
        return 0
    print("does not fit; try, in this order:", *(f"  {tip}" for tip in plan.advice(cfg, result)),
          sep="\n")
    return 3


if __name__ == "__main__":
    sys.exit(main())
