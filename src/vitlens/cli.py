"""The ``vitlens`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import VitlensError
from .options import int_at_least, non_negative_int, number, positive_int
from .trainables import TRAINABLES


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, or says it is required (unless the help already says)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default is False or action.default == []:
            return text
        return f"{text} (default: %(default)s)"


def one_line(message: str) -> str:
    """A message on one line: line breaks (e.g. inside a file name) are shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def finite_json(obj: object) -> str:
    """``json.dumps`` that writes NaN and infinities as ``null`` (strict JSON, never ``NaN``)."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _device(v: str) -> str:
    import torch

    try:
        dev = torch.device(v)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {v!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{v}: no CUDA device is available (use cpu)")
    return v


def _train_options(p: argparse.ArgumentParser, lr: float | None = 1e-3, length: str = "1 epoch") -> None:
    """The loop's options, shared by every ``vitlens train`` command; ``lr=None``: the training function
    chooses ``--batch-size``, ``--lr`` and ``--warmup-steps`` when they are not given; ``length``: the run's
    length without ``--epochs`` and ``--max-steps``."""
    chosen = "" if lr else " (default: chosen for the data set, printed)"
    p.add_argument("--data", required=True, help="data spec, e.g. fashion-canvas:train")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    run_length = p.add_mutually_exclusive_group()
    run_length.add_argument("--epochs", type=number(),
                            help=f"passes over --data (default without --max-steps: {length})")  # fmt: skip
    run_length.add_argument("--max-steps", type=positive_int, help="optimiser steps to run (default: set by --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64 if lr else None,
                   help="images per step (per process under torchrun)" + chosen)  # fmt: skip
    p.add_argument("--lr", type=number(), default=lr, help="peak learning rate" + chosen)
    p.add_argument("--weight-decay", type=number(strict=False), default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=non_negative_int, default=100 if lr else None,
                   help="linear warm-up before the cosine decay; at most half the run" + chosen)  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data order, masks and init")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader worker processes")
    p.add_argument("--checkpoint-every", type=number(strict=False), default=30.0, help="seconds between checkpoints")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--autocast", choices=["bf16"],
                   help="mixed precision (float32 weights); fast on CPUs with AMX (default: float32)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out (with the same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")


def _train_config(a: argparse.Namespace):
    from .training import TrainConfig

    return TrainConfig(
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        epochs=a.epochs, max_steps=a.max_steps, seed=a.seed, checkpoint_every_s=a.checkpoint_every,
        num_workers=a.workers, device=a.device, autocast=a.autocast,
    )  # fmt: skip


MODEL_HELP = (
    "vitlens:NAME (see `vitlens models`), timm:NAME, hf:NAME, torchvision:NAME, bcos:NAME, open_clip:NAME/TAG or a "
    "checkpoint directory"
)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="vitlens", description="Explain the decisions of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a classifier or a trainable explainer")
    tsub = train.add_subparsers(dest="task", required=True, parser_class=_Parser)
    for trainable in TRAINABLES.values():
        command = tsub.add_parser(trainable.name, help=trainable.summary, epilog=trainable.epilog or None)
        _train_options(command, lr=trainable.lr, length=trainable.length)
        trainable.add_options(command)

    ex = sub.add_parser("explain", help="explain image files with one method")
    ex.add_argument("images", nargs="+", help="image files or folders of them")
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--method", default="rollout", help="explanation method (see `vitlens methods`)")
    target = ex.add_mutually_exclusive_group()
    target.add_argument("--target", help="class to explain, an index or a name (default: the predicted class)")
    target.add_argument("--top-k", type=positive_int, metavar="K",
                        help="explain each image's K top classes (default: one map, for --target)")  # fmt: skip
    ex.add_argument("--out", default="vitlens-out",
                    help="output folder: maps (.npy) and overlays (.png) mirror the inputs' folder tree")  # fmt: skip
    ex.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cpu)")
    ex.add_argument("--boxes", type=float, nargs="?", const=0.5, default=None, metavar="TAU",
                    help="also write the box each map implies (largest component above TAU x max; TAU default 0.5) "
                         "to OUT/localization.txt (default: no boxes)")  # fmt: skip
    ex.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    ex.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    ex.add_argument("--json", action="store_true", help="print one JSON list with a record per image (streamed)")

    sub.add_parser("methods", help="list the explanation methods")
    models = sub.add_parser("models", help="list the models shipped with vitlens (load them as vitlens:NAME)")
    models.add_argument("--json", action="store_true", help="print one JSON list instead of the table")

    info = sub.add_parser("info", help="describe a model's layout as vitlens sees it")
    info.add_argument("model", help=MODEL_HELP)

    bn = sub.add_parser("bench", help="time methods against one plain forward pass")
    bn.add_argument("--model", default="timm:deit_small_patch16_224?pretrained=0", help=MODEL_HELP)
    bn.add_argument("--methods", default="pm,attention,rollout", help="comma-separated method names")
    bn.add_argument("--batch-size", type=positive_int, default=16, help="images per timed batch")
    bn.add_argument("--image-size", type=int_at_least(1, "an image size in 1..4096", 4096),
                    help="square input size (default: the model's own)")  # fmt: skip
    bn.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    bn.add_argument("--repeat", type=positive_int, default=5, help="timed rounds; the median is reported")
    bn.add_argument("--autocast", choices=["bf16", "fp16"],
                    help="time everything under torch.autocast (default: float32)")  # fmt: skip
    bn.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    demo = sub.add_parser("demo", help="evaluate the shipped fashion models (vitlens models): an HTML report")
    demo.add_argument("--out", default="demo-out", help="output directory (report.html, gallery.png, results/)")
    demo.add_argument("-n", "--images", type=positive_int,
                      help="at most N images per metric group (default: 400, 100 or 64 by group)")  # fmt: skip
    demo.add_argument("--gallery", type=non_negative_int, default=8, help="images in the report's gallery")
    demo.add_argument("--train", action="store_true", help="first re-create every checkpoint from scratch (hours)")

    ev = sub.add_parser("evaluate", help="score explanation methods with the evaluation metrics (torchrun: sharded)")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--methods", required=True, help="comma-separated methods (see `vitlens methods`)")
    ev.add_argument("--metrics", default="all", help="comma-separated metrics (see `vitlens metrics`), or all")
    ev.add_argument("--data", required=True, help="data spec, e.g. fashion-canvas:test or fashion-grid:test:n=500")
    ev.add_argument("--limit", type=positive_int, help="evaluate the first N samples only (default: all)")
    ev.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    ev.add_argument("--target", choices=["label", "predicted"], default="label", help="class the maps explain")
    ev.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="a method's or metric's option, e.g. deletion.fill=blur (repeatable)")  # fmt: skip
    ev.add_argument("--protocol", help="a reference protocol for every metric that has it: wsol, bcos, chefer, "
                    "diffmask, rise (default: vitlens' own settings, see each metric's card)")  # fmt: skip
    ev.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                    help="bootstrap replicates for the 95%% intervals and significance marks (0: none)")  # fmt: skip
    ev.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", help="write the results, per-image values and curves to this JSON file (default: none)")
    ev.add_argument("--gallery", type=non_negative_int, default=8, help="images (with every map) kept in --out")
    ev.add_argument("--resume", action="store_true",
                    help="continue an interrupted run of this command (state kept beside --out)")  # fmt: skip
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    sub.add_parser("metrics", help="list the evaluation metrics")

    rp = sub.add_parser("report", help="a self-contained HTML report from `vitlens evaluate --out` files")
    rp.add_argument("results", nargs="+", help="results files of `vitlens evaluate --out` (several merge)")
    rp.add_argument("--out", default="report.html", help="the HTML file to write")
    rp.add_argument("--title", default="vitlens report", help="the report's heading")
    return parser


def cmd_explain(a: argparse.Namespace) -> int:

    from .files import explain_files
    from .options import parse_options

    failed: list[str] = []  # only the bad files are kept: memory stays flat over any number of images
    done = 0
    options = parse_options(a.option, what="--option")
    target = int(a.target) if a.target is not None and a.target.lstrip("-").isdigit() else a.target
    run = explain_files(a.images, a.model, a.method, target=target, top_k=a.top_k, out=a.out,
                        batch_size=a.batch_size, options=options, device=a.device, boxes=a.boxes)  # fmt: skip
    try:
        for r in run:  # records are printed as they come (the --json list too)
            if "error" not in r and not math.isfinite(r.get("probability", 0.0)):  # a model whose outputs overflow
                r = {"image": r["image"], "error": f"{r['image']}: the model's output is not finite (NaN or Inf)"}
            if a.json:
                print(("[\n" if done == 0 else ",\n") + finite_json(r), end="", flush=True)
            elif "error" not in r:
                shown = r["overlay"] if "overlay" in r else ", ".join(r["overlays"])
                said = f"{r['predicted_class']} ({r['probability']:.2f})" if "predicted" in r else r["target_class"]
                print(f"{r['image']}: {said} -> {shown}")
            done += 1
            if "error" in r:
                failed.append(r["error"])
    finally:
        if a.json and done:
            print("\n]")
    if a.json and not done:
        print("[]")
    for error in failed:  # the bad files, reported at the end
        print(f"vitlens: error: {one_line(error)}", file=sys.stderr)
    if failed and done > 1:
        print(f"vitlens: error: {len(failed)} of {done} images could not be read (listed above); "
              f"{done - len(failed)} explained into {a.out}", file=sys.stderr)  # fmt: skip
    return 2 if failed else 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .explainers import EXPLAINERS
    from .explainers.base import option_docs

    for name, cls in sorted(EXPLAINERS.items()):
        print(f"{name}: {cls.meaning}")
        print(f"    paper: {cls.paper}")
        print(f"    cost: {cls.cost}; display scale: {cls.scale}")
        docs, types = option_docs(cls), cls.option_types()
        for option, default in cls.options().items():
            print(f"    option {option}: {types[option]} = {default!r}  {docs.get(option, '')}".rstrip())
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    import json

    from .pretrained import describe, names

    rows = [describe(n) for n in names()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "kind", "base", "classes", "input", "figure", "size")
    cells = [(r["name"], r["kind"], r["base"], str(r["classes"]), "×".join(map(str, r["input_size"])), r["figure"],
              f"{r['size_mb']:.1f} MB") for r in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    for row, r in zip([header, *cells], [None, *rows], strict=True):
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())
        if r is not None:
            print(f"    {r['description']}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .models import load_model

    print(json.dumps(load_model(a.model).describe(), indent=2))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:

    import torch

    from .bench import bench, format_bench
    from .explainers import EXPLAINERS

    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown or not methods:
        raise VitlensError(
            f"unknown method(s) {', '.join(unknown) or '(none)'} (known: {', '.join(sorted(EXPLAINERS))})"
        )
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise VitlensError("--device cuda: no CUDA device is available")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.autocast)
    record = bench(a.model, methods, batch_size=a.batch_size, image_size=a.image_size, device=a.device, repeat=a.repeat,
                   autocast=autocast)  # fmt: skip
    print(finite_json(record) if a.json else format_bench(record))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    from .io import check_output_dir

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = run_demo(check_output_dir(a.out, "--out"), images=a.images, gallery=a.gallery, train=a.train, log=log)
    print(f"report: {summary['report']}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .io import check_replaceable, is_html_page
    from .viz.report import write_report

    check_replaceable(a.out, "report output", "an HTML page", is_html_page)
    print(f"report: {write_report(a.results, a.out, title=a.title)}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:

    from .io import check_replaceable, is_results_file
    from .metrics import evaluate, format_table, parse_options

    if a.out is not None:
        check_replaceable(a.out, "--out", "a vitlens results file", is_results_file)
    try:
        summary = evaluate(
            a.model, a.methods, a.metrics, a.data, limit=a.limit, batch_size=a.batch_size, target=a.target,
            options=parse_options(a.option), device=a.device, out=a.out, gallery=a.gallery, protocol=a.protocol,
            replicates=a.bootstrap, resume=a.resume,
        )  # fmt: skip
    except KeyboardInterrupt:
        if a.out is not None:
            print("vitlens: interrupted; the work up to the last saved batch is kept: run the same command with "
                  "--resume to continue", file=sys.stderr)  # fmt: skip
            return 130
        raise
    if summary is None:  # the other torchrun processes
        return 0
    print(finite_json(summary) if a.json else format_table(summary))
    skipped = summary.get("skipped", [])
    for s in skipped:  # samples that could not be read (folder data), reported at the end
        print(f"vitlens: error: {one_line(s['error'])}", file=sys.stderr)
    if skipped:
        print(f"vitlens: error: {len(skipped)} samples could not be read (listed above); the scores leave them out",
              file=sys.stderr)  # fmt: skip
    return 2 if skipped else 0


def cmd_metrics(a: argparse.Namespace) -> int:
    from .metrics import METRICS

    rows = [(name, ", ".join(cls.needs) or "maps", cls.paper + (f" [protocols: {', '.join(cls.protocols)}]"
             if cls.protocols else "")) for name, cls in sorted(METRICS.items())]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    nw = max(len(r[1]) for r in rows)
    for name, needs, paper in rows:
        print(f"{name:<{width}}  {needs:<{nw}}  {paper}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .io import check_output_dir
    from .training.loop import check_training_out, release_out

    check_output_dir(a.out, "--out", create=False)
    if a.resume and a.overwrite:
        raise VitlensError("--resume and --overwrite exclude each other")
    try:
        check_training_out(a.out, resume=a.resume, overwrite=a.overwrite)  # before any work: refused in one line
        return _train(a)
    finally:
        release_out(a.out)  # also when refused before the loop started


def _train(a: argparse.Namespace) -> int:
    trainable = TRAINABLES[a.task]
    options = {name: getattr(a, name) for name in trainable.option_names()}
    summary = trainable.training_function()(
        data=a.data, out=a.out, cfg=_train_config(a), resume=a.resume, overwrite=a.overwrite, **options
    )
    print(json.dumps({"out": a.out, **summary}))
    return 0


COMMANDS = {
    "train": cmd_train,
    "explain": cmd_explain,
    "methods": cmd_methods,
    "models": cmd_models,
    "info": cmd_info,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "evaluate": cmd_evaluate,
    "metrics": cmd_metrics,
    "report": cmd_report,
}


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one ``vitlens: warning:`` line, without Python's source location."""
    print(f"vitlens: warning: {one_line(str(message))}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        return COMMANDS[args.command](args)
    except VitlensError as e:
        print(f"vitlens: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`vitlens explain … --json | head`): stop quietly
        sys.stderr.close()
        return 141
    finally:
        warnings.showwarning = shown
