"""The ``vitlens`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys

from .errors import VitlensError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data spec, e.g. fashion-canvas:train")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--max-steps", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between checkpoints")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")


def _train_config(a: argparse.Namespace):
    from .training import TrainConfig

    return TrainConfig(
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        epochs=a.epochs, max_steps=a.max_steps, seed=a.seed, checkpoint_every_s=a.checkpoint_every,
        num_workers=a.workers, device=a.device,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlens", description="Explain the decisions of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitlens {__import__('vitlens').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a classifier or a trainable explainer")
    tsub = train.add_subparsers(dest="task", required=True, parser_class=_Parser)
    clf = tsub.add_parser("classifier", help="train a ViT classifier")
    _train_options(clf)
    clf.add_argument("--arch", help="architecture preset (fashion-vit, counting-vit, …) or timm model name")
    clf.add_argument("--eval-data", help="held-out data spec (default: the test split of --data)")
    pm = tsub.add_parser("pm", help="PM fine-tuning: patch-level mask prediction (Kang et al. 2025)")
    _train_options(pm)
    pm.add_argument("--model", required=True, help="the classifier to fine-tune (URI or checkpoint directory)")
    pm.add_argument("--mask-fraction", type=float, default=0.01, help="share of training images whose masks are used")
    pm.add_argument("--lambda", dest="lam", type=float, default=10.0, help="weight of the patch-level BCE")
    pm.add_argument("--pos-weight", type=float, default=1.0, help="weight of positive (object) patch targets")
    pm.add_argument("--mask-batch", type=_positive_int, default=8, help="masked images in every batch")
    pm.add_argument("--pseudo-masks", type=int, default=0, metavar="ROUNDS", help="self-training rounds")
    pm.add_argument("--eval-data", help="held-out data spec (default: the test split of --data)")
    bn = sub.add_parser("bench", help="time methods against one plain forward pass")
    bn.add_argument("--model", default="timm:deit_small_patch16_224?pretrained=0")
    bn.add_argument("--methods", default="pm,attention,rollout", help="comma-separated method names")
    bn.add_argument("--batch-size", type=_positive_int, default=16)
    bn.add_argument("--image-size", type=_positive_int)
    bn.add_argument("--device", default="cpu")
    bn.add_argument("--repeat", type=_positive_int, default=5)
    bn.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="explain fashion canvases with the committed checkpoint")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("-n", type=_positive_int, default=8, help="number of images")
    return parser


def cmd_explain(a: argparse.Namespace) -> int:
    import json

    from .files import explain_files

    records, failed = [], 0
    for r in explain_files(a.images, a.model, a.method, target=a.target, out=a.out, batch_size=a.batch_size):
        records.append(r)
        if "error" in r:
            failed += 1
            print(f"vitlens: error: {r['error']}", file=sys.stderr)
        elif not a.json:
            print(f"{r['image']}: {r['predicted_class']} ({r['probability']:.2f}) -> {r['overlay']}")
    if a.json:
        print(json.dumps(records, indent=2))
    return 2 if failed else 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .explainers import EXPLAINERS

    rows = [(name, cls.cost, cls.paper) for name, cls in sorted(EXPLAINERS.items())]
    width = max(len(r[0]) for r in rows)
    cw = max(len(r[1]) for r in rows)
    for name, cost, paper in rows:
        print(f"{name:<{width}}  {cost:<{cw}}  {paper}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .backbones import load_model

    print(json.dumps(load_model(a.model).describe(), indent=2))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import json

    from .bench import bench, format_bench
    from .explainers import EXPLAINERS

    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown or not methods:
        raise VitlensError(
            f"unknown method(s) {', '.join(unknown) or '(none)'} (known: {', '.join(sorted(EXPLAINERS))})"
        )
    if a.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise VitlensError("--device cuda: no CUDA device is available")
    record = bench(a.model, methods, batch_size=a.batch_size, image_size=a.image_size, device=a.device, repeat=a.repeat)
    print(json.dumps(record) if a.json else format_bench(record))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(a.out, n=a.n)
    print(f"wrote {summary['images']} images x {len(summary['methods'])} methods; overview: {summary['overview']}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    import json

    from .training import train_classifier

    if a.task == "pm":
        from .training import train_pm

        summary = train_pm(
            a.model, a.data, a.out, _train_config(a), mask_fraction=a.mask_fraction, lam=a.lam,
            pos_weight=a.pos_weight, mask_batch=a.mask_batch, pseudo_rounds=a.pseudo_masks, resume=a.resume,
            eval_data=a.eval_data,
        )  # fmt: skip
    if a.task == "classifier":
        summary = train_classifier(a.data, a.out, _train_config(a), arch=a.arch, resume=a.resume, eval_data=a.eval_data)
    print(json.dumps({"out": a.out, **summary}))
    return 0


COMMANDS = {
    "train": cmd_train,
    "explain": cmd_explain,
    "methods": cmd_methods,
    "info": cmd_info,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VitlensError as e:
        print(f"vitlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlens: interrupted", file=sys.stderr)
        return 130
