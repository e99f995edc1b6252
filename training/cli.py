r"""`python -m training <command>`: prepare, train, tune, evaluate, export (and publish, bench).

Each command reads a YAML config (defaults: training/config.py) and `--set key.path=value`
overrides, e.g.

    python -m training prepare --config training/configs/kidney.yaml
    python -m training train   --config training/configs/kidney.yaml --method maml --out runs/kidney
    python -m training tune    --config training/configs/kidney.yaml --prior runs/kidney/best.safetensors \
        --setting first_step_scale=1,1.4,1.7
    python -m training evaluate --config training/configs/kidney.yaml --prior runs/kidney/best.safetensors
    python -m training export  --config training/configs/kidney.yaml --prior runs/kidney/best.safetensors \
        --name kidney --results runs/kidney/evaluation
    python -m training bench   --config training/configs/kidney.yaml --prior Resources/Priors/kidney.safetensors
"""

import argparse
import json
import os
import sys

import yaml
from MetaShapeReconLib.errors import InputError

from .config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="YAML config (defaults in training/config.py)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. maml.iterations=100 (repeatable)")
        return sub

    prepare = command("prepare", "cache canonical crops and write split files")
    prepare.add_argument("--workers", type=int, default=2)

    train = command("train", "train a prior (maml), or a baseline (pretrain, autodecoder)")
    train.add_argument("--method", choices=("maml", "pretrain", "autodecoder"), default="maml")
    train.add_argument("--out", required=True, help="run folder: checkpoints and logs")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")

    evaluate = command("evaluate", "the paper's protocol on the test split: tables and plots")
    evaluate.add_argument("--prior", help="meta-learned prior (.safetensors)")
    evaluate.add_argument("--pretrain", help="B.(ii) network (.safetensors)")
    evaluate.add_argument("--autodecoder", help="B.(i) model (.safetensors)")
    evaluate.add_argument("--transfer", action="append", default=[], metavar="NAME=CONFIG",
                          help="also evaluate the prior on another anatomy's test split")
    evaluate.add_argument("--reuse", metavar="RESULTS_CSV",
                          help="an earlier evaluation's results.csv on the same inputs: the methods this run "
                               "does not evaluate (e.g. B.(i) and B.(ii) when only the prior changed) are taken from it")
    evaluate.add_argument("--reuse-transfer", metavar="TRANSFER_CSV",
                          help="likewise for the transfer table (transfer.csv)")
    evaluate.add_argument("--out", required=True, help="folder for tables (markdown, CSV) and plots")

    export = command("export", "write NAME.safetensors + NAME.json for the engine and Slicer")
    export.add_argument("--prior", required=True, help="trained prior (.safetensors)")
    export.add_argument("--name", required=True)
    export.add_argument("--results", help="evaluation folder whose tables go into the model card")
    export.add_argument("--out", default="Resources/Priors")

    tune = command("tune", "validation Dice for each value of a reconstruction setting (the card's adaptation)")
    tune.add_argument("--prior", required=True, help="prior (.safetensors)")
    tune.add_argument("--setting", required=True, metavar="NAME=V1,V2,...",
                      help="an adaptation setting and the values to try, e.g. first_step_scale=1,1.4,1.7 "
                           "or auto.lr=5e-5,1e-4")

    bench = command("bench", "time the outer step in float32 and bfloat16 on the same batches, "
                    "with how closely the meta-gradients agree")
    bench.add_argument("--prior", help="prior to start from (.safetensors; default: a new initialisation)")
    bench.add_argument("--batches", type=int, default=6)
    bench.add_argument("--first-order", action="store_true", help="the first-order outer step (default: second order)")

    publish = commands.add_parser("publish", help="gather evaluation folders into docs/RESULTS.md "
                                  "(priors published earlier and not given keep their sections)")
    publish.add_argument("--results", nargs="+", required=True, metavar="NAME=FOLDER")
    publish.add_argument("--out", default="docs")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (InputError, OSError, yaml.YAMLError) as error:  # a missing or unreadable file: one line, no traceback
        raise SystemExit(f"python -m training {args.command}: {' '.join(str(error).split())}") from None
    except KeyboardInterrupt:
        hint = ("; `--resume` with the same --out continues from its last checkpoint"
                if args.command == "train" else "")
        print(f"python -m training {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "publish":
        from .publish import publish as publish_results

        print(publish_results(args.results, args.out))
        return 0
    config = load_config(args.config, args.overrides)
    if int(config.get("threads") or 0) > 0:
        import torch

        torch.set_num_threads(int(config["threads"]))
    if args.command == "prepare":
        from .prepare import prepare

        print(json.dumps(prepare(config, workers=args.workers), indent=1))
    elif args.command == "train":
        _check_run_folder(args.out, args.method, args.resume)
        if args.method == "maml":
            from .maml import train_maml as train_method
        elif args.method == "pretrain":
            from .pretrain import train_pretrain as train_method
        else:
            from .autodecoder import train_autodecoder as train_method
        print(train_method(config, args.out, resume=args.resume))
        _leave_process_group()  # not after a failure: the others may never reach the barrier
    elif args.command == "evaluate":
        from .evaluate import run_evaluation

        run_evaluation(config, args)
    elif args.command == "tune":
        from .tune import format_row, header, parse_setting, tune, validation_shapes

        name = parse_setting(args.setting)[0]
        shapes = validation_shapes(config)
        rows = []

        def report(row):  # the header with the first row: tune checks every value before it
            if not rows:
                print(header(name, len(shapes), config), flush=True)
            rows.append(row)
            print(format_row(row), flush=True)

        tune(config, args.prior, args.setting, shapes, report=report)
    elif args.command == "bench":
        from .bench import bench_outer_step

        bench_outer_step(config, args.prior, args.batches, args.first_order)
    elif args.command == "export":
        from .export import export_prior

        print(export_prior(config, args.prior, args.name, args.results, args.out))
    return 0


def _check_run_folder(out: str, method: str, resume: bool) -> None:
    """A folder with a checkpoint or a log holds a run (one killed before its first checkpoint
    too): it is continued with --resume only, and by the method that wrote its checkpoint."""
    held = any(os.path.isfile(os.path.join(out, name))
               for name in ("checkpoint.safetensors", "log.csv", "validation.csv"))
    if held and not resume:
        raise SystemExit(f"{out} already holds a training run: add --resume to continue it, or choose another --out")
    card_path = os.path.join(out, "checkpoint.json")
    if resume and os.path.isfile(card_path):
        from .files import read_json

        card = read_json(card_path, "checkpoint card", "restore it, or train into another --out")
        earlier = "autodecoder" if card.get("format") == "metashaperecon-autodecoder" \
            else card.get("training", {}).get("method")
        if earlier and earlier != method:
            raise SystemExit(f"{out} holds a run of --method {earlier}: resume it with --method {earlier}, "
                             "or choose another --out")


def _leave_process_group() -> None:
    """Under torchrun: wait for every process, close the group, and end the process here. A
    process that exits with the group open can abort in the communication threads' teardown
    (SIGABRT); one that closed it still did, rarely, when Gloo's objects were destroyed at
    interpreter shutdown ("terminate called without an active exception"), so it ends without
    that shutdown: its files are closed and its output is flushed by then."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
