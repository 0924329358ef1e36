"""``seglab`` on the command line: a thin layer over :mod:`seglab.api`.

Train flags are generated from :class:`seglab.config.TrainConfig`, so a flag and a
config-file key are the same thing. Every user error ends as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path

from seglab.config import TrainConfig, field_help
from seglab.errors import SeglabError
from seglab.registry import did_you_mean

EXPORT_FORMATS = ("onnx", "torchscript", "torch-export")


class _Parser(argparse.ArgumentParser):
    """argparse, but every mistake is one line with a suggestion and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("argument --conf:"):  # it was a switch once, and YOLO's --conf is a threshold
            message += " (a detector's score threshold, e.g. --conf 0.25; --save-conf saves confidence maps)"
        raise SeglabError(f"{self._command()}{message}")

    def _command(self) -> str:
        """'train: ' for `seglab train`, nothing for plain `seglab` (main adds 'seglab: error:')."""
        command = self.prog.removeprefix("seglab").strip()
        return f"{command}: " if command else ""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = next((u for u in unknown if u.startswith("-")), unknown[0])
            parser = getattr(ns, "_parser", self)
            options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            hint = did_you_mean(flag.split("=")[0], options) if flag.startswith("-") else ""
            key, is_pair, value = flag.partition("=")
            if is_pair and not flag.startswith("-"):  # Ultralytics' key=value form
                option = "--" + key.replace("_", "-")
                hint = f" (seglab takes {option} {value})" if option in options else " (seglab takes --key value flags)"
            raise SeglabError(f"{parser._command()}unrecognised argument {flag}{hint}; see {parser.prog} --help")
        return ns


def _add_config_flags(p: argparse.ArgumentParser, schema: type = TrainConfig) -> None:
    """A flag per field of a config dataclass (TrainConfig, GenConfig), its comment as the help."""
    hints = typing.get_type_hints(schema)
    helps = field_help(schema)
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the flags below as keys")
    for f in dataclasses.fields(schema):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        is_optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if is_optional else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        text = f"{helps.get(f.name, '')} (default: {default})".strip()
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            p.add_argument(flag, nargs="+", type=item, default=None, help=text, metavar=item.__name__.upper())
        else:
            p.add_argument(flag, type=base, default=None, help=text, metavar=base.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seglab", description="Train, evaluate and predict segmentation and detection models.", allow_abbrev=False
    )
    from seglab import __version__

    parser.add_argument("--version", action="version", version=f"seglab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.set_defaults(_parser=p)
        return p

    _add_config_flags(command("train", "train a model"))

    p = command("val", "evaluate weights on a dataset split")
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint or export")
    p.add_argument("--data", help="dataset (default: the one the weights were trained on)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")
    _add_inference_flags(p)
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--strict-data", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="folder for metrics.json (default: runs/val/<name>, numbered)")
    p.add_argument("--name", default="exp")

    p = command("predict", "predict masks for images")
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint or export")
    p.add_argument("--source", required=True, help="an image, a folder of images")
    _add_inference_flags(p)
    p.add_argument("--img-size", type=int, help="resize the long side to this (default: the training size)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (same-size images; default: 1)")
    p.add_argument(
        "--conf", type=float, default=None, help="detectors: keep objects scoring this or more (default: 0.25)"
    )
    p.add_argument("--save-conf", action="store_true", help="semantic models: also save per-pixel confidence maps")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: 0.5)")
    p.add_argument(
        "--unpainted", nargs="+", metavar="CLASS",
        help="semantic models: classes the overlay leaves unpainted (default: background; none: paint all)",
    )  # fmt: skip
    p.add_argument("--out", help="write masks/ and overlays/ here (default: runs/predict/<name>, numbered)")
    p.add_argument("--name", default="exp")

    p = command("data", "inspect datasets")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    check = data_sub.add_parser("check", help="find every problem in a dataset", allow_abbrev=False)
    check.set_defaults(_parser=check)
    check.add_argument("path", nargs="?", help="dataset folder or data.yaml (or give it as --data)")
    check.add_argument("--data", help="the same as PATH, as train and val take it")
    check.add_argument(
        "--task", choices=["semantic", "instance"], default="semantic",
        help="instance: count objects per class and image, box sizes, empty images, degenerate polygons",
    )  # fmt: skip
    convert = data_sub.add_parser(
        "convert", help="write a dataset as PNG masks, COCO JSON or YOLO-seg labels", allow_abbrev=False
    )
    convert.set_defaults(_parser=convert)
    convert.add_argument("source", metavar="SRC", help="dataset folder, data.yaml or built-in name (any layout)")
    convert.add_argument("--to", required=True, metavar="FORMAT", help="png (semantic), coco (instance) or yolo")
    convert.add_argument("--out", required=True, help="new or empty folder to write to")
    convert.add_argument(
        "--task", choices=["semantic", "instance"], default="semantic",
        help="instance: read mask files as instance ids, one object per id (default: semantic masks)",
    )  # fmt: skip
    convert.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")
    pack = data_sub.add_parser(
        "pack", help="write a dataset as tar shards (WebDataset format) with a dataset.json", allow_abbrev=False
    )
    pack.set_defaults(_parser=pack)
    pack.add_argument("--data", required=True, help="dataset folder, data.yaml or built-in name")
    pack.add_argument("--out", required=True, help="new or empty folder for <split>-NNNNNN.tar and dataset.json")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most (default: 1000)")
    pack.add_argument("--max-bytes", type=int, default=1 << 30, help="bytes per shard, about (default: 1 GiB)")
    pack.add_argument("--limit", type=int, help="pack only the first N samples of each split")
    pack.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")

    p = command("demo", "train, evaluate and predict on a generated dataset (no download)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: a 2-minute budget)")

    command("models", "list architectures and encoders")

    p = command("export", "export weights to ONNX, TorchScript or torch.export, with a parity check")
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint (semantic or detector)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx, torchscript or torch-export")
    p.add_argument("--out", metavar="FILE", help="the exported file (default: next to the weights)")
    p.add_argument("--dynamic", action="store_true", help="any batch size and image size (default: fixed)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size at the fixed image size")
    p.add_argument("--half", action="store_true", help="float16 weights and activations")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="input H W (default: the training crop)")
    p.add_argument("--batch", type=int, default=1, help="input batch size when not --dynamic (default: 1)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--data", help="images for the parity check (default: the training data's val split)")
    p.add_argument("--check-images", type=int, default=8, help="images in the parity check (default: 8)")
    add_trust_flag(p)

    p = command("quantize", "int8 post-training quantisation (ONNX Runtime or PyTorch PT2E), with a report")
    p.add_argument(
        "--weights", required=True, metavar="FILE", help="a seglab checkpoint (or, for ONNX Runtime, its ONNX export)"
    )
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "pytorch"],
        help="onnxruntime (default: an int8 .onnx) or pytorch (PT2E with the x86 Inductor quantiser: an int8 .pt2; "
        "the default with --qat)",
    )
    p.add_argument(
        "--qat", action="store_true",
        help="pytorch: quantisation-aware training on the model's own data and recipe instead of calibration",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=3, help="--qat: fine-tune epochs (default: 3)")
    p.add_argument("--lr", type=float, help="--qat: learning rate (default: the training run's / 10)")
    p.add_argument(
        "--resume", metavar="FILE",
        help="--qat: continue a stopped quantisation-aware training from its runs/qat/<name>/weights/last.pt",
    )  # fmt: skip
    p.add_argument("--data", help="calibration and evaluation data (default: the training data)")
    p.add_argument("--calib", type=int, default=64, help="calibration images from the train split (default: 64)")
    p.add_argument(
        "--method", choices=["minmax", "entropy", "percentile"], help="onnxruntime calibration (default: minmax)"
    )
    p.add_argument(
        "--quant-format",
        choices=["qdq", "qoperator"],
        help="onnxruntime: qdq (default; also what TensorRT reads) or qoperator (fixed-shape exports only)",
    )
    p.add_argument("--out", metavar="FILE", help="the int8 file (default: next to the weights)")
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure size, speed and val mIoU against the float model (default: on)",
    )
    p.add_argument("--limit", type=int, help="report: evaluate only the first N val images")
    p.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")
    add_trust_flag(p)

    p = command("benchmark", "export to every format, check each, then time and score them all in one run")
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint (semantic)")
    p.add_argument("--data", help="images to score on (default: the training data)")
    p.add_argument("--split", default="val", help="split to score on (default: val)")
    p.add_argument("--limit", type=int, help="score only the first N images")
    p.add_argument(
        "--formats", nargs="+", metavar="FORMAT", default=None,
        help="pytorch pytorch-amp onnx torchscript torch-export onnx-int8 pytorch-int8 (default: all)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=10, help="timing rounds of each batch size (default: 10)")
    p.add_argument("--calib", type=int, default=64, help="onnx-int8: calibration images (default: 64)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON here")
    p.add_argument("--out", help="new or empty folder for the exports and the table (default: runs/benchmark/<name>)")
    p.add_argument("--name", default="exp")
    p.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")
    add_trust_flag(p)

    from seglab.deploy.prune_command import add_arguments as add_prune_arguments
    from seglab.serve.command import add_arguments as add_serve_arguments

    add_prune_arguments(command("prune", "remove channels, fine-tune, and report size, speed and mIoU"))
    add_serve_arguments(command("serve", "serve a model over HTTP, with a page at /"))
    _add_gen_commands(
        command("gen", "images from label maps (pix2pix, SPADE) or noise (DCGAN, VAE, StyleGAN2), synthetic data")
    )
    return parser


def _add_gen_commands(p: argparse.ArgumentParser) -> None:
    from seglab.gen.config import GenConfig

    sub = p.add_subparsers(dest="gen_command", metavar="ACTION", parser_class=_Parser)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        q.set_defaults(_parser=q)
        return q

    _add_config_flags(action("train", "train a generator (run folder in runs/gen/<name>)"), GenConfig)

    q = action("sample", "paint a folder of label maps (pix2pix, spade), or --n images from noise (the others)")
    q.add_argument("--weights", required=True, metavar="FILE", help="a generator from seglab gen train")
    q.add_argument("--masks", help="a label-map image or a folder of them (class indices, or the class colours)")
    q.add_argument("--out", required=True, help="folder for the generated PNGs")
    q.add_argument("--n", type=int, default=16, help="dcgan, vae, stylegan: how many images (default: 16)")
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seed", type=int, default=0, help="noise and dropout seed (default: 0)")
    q.add_argument(
        "--truncation", type=float, metavar="PSI",
        help="stylegan: w = w_avg + PSI (w - w_avg), 0 (the mean image) to 1 (no truncation; the default)",
    )  # fmt: skip
    q.add_argument(
        "--mixing-grid", type=int, nargs=2, metavar=("ROWS", "COLS"),
        help="stylegan: write mixing_grid.png instead of --n images: coarse styles from each row's image, "
        "fine styles from each column's",
    )  # fmt: skip
    q.add_argument(
        "--crossover", type=int, metavar="LAYER",
        help="--mixing-grid: the first style layer taken from the column (default: half of the layers)",
    )  # fmt: skip
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_trust_flag(q)

    q = action("augment", "write generated image/mask pairs as a dataset that seglab train reads")
    q.add_argument("--weights", required=True, metavar="FILE", help="a pix2pix or spade generator")
    q.add_argument("--out", required=True, help="folder for images/, masks/, train.txt, val.txt and data.yaml")
    q.add_argument("--data", help="label maps from this dataset's train split (default: the generator's data)")
    q.add_argument("--n", type=int, help="pairs to write (default: one per training label map)")
    q.add_argument(
        "--rare", nargs="+", default=[], metavar="CLASS", help="classes to favour: maps rich in them are drawn more"
    )
    q.add_argument(
        "--paste", type=int, default=0, help="paste the --rare regions of this many other maps into each (default: 0)"
    )
    q.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="list the real training pairs too (default: on)",
    )
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--data-cache", help="where built-in datasets live (default: ~/.cache/seglab/datasets)")
    add_trust_flag(q)

    q = action("eval", "score a generator: segmenter mIoU on its images, FD/KID on Lite0 and Inception features")
    q.add_argument("--weights", required=True, metavar="FILE", help="a generator from seglab gen train")
    q.add_argument("--segmenter", metavar="FILE", help="a seglab segmentation checkpoint of the same classes")
    q.add_argument("--data", help="dataset (default: the generator's own)")
    q.add_argument("--split", default="val", help="split whose label maps and images are used (default: val)")
    q.add_argument("--limit", type=int, help="only the first N images")
    q.add_argument("--inception-weights", metavar="FILE", help="torch-fidelity's Inception weights, for FID offline")
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--out", help="folder for metrics.json (default: runs/gen_eval/<name>, numbered)")
    q.add_argument("--name", default="exp")
    add_trust_flag(q)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true", help="test-time augmentation: flip and scales 0.75/1/1.25")
    p.add_argument("--slide", action="store_true", help="sliding-window inference with the training crop")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    add_trust_flag(p)


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    """--trust-weights: the one opt-in to checkpoints that need pickled code (they can run anything)."""
    p.add_argument(
        "--trust-weights",
        action="store_true",
        help="also load a checkpoint that needs pickled Python objects (they can run code: only files you made)",
    )


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM, until a command defers it: stop as Ctrl-C does (finally blocks remove what was being
    written), not at once as SIGTERM's default action would."""
    from seglab.engine.stopping import Interrupted

    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except SeglabError as e:
        print(f"seglab: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that is read-only, full, or a file where a folder should be
        where = e.filename or "the output folder"
        fix = {
            errno.ENOSPC: "free some space or choose another --out",
            errno.EACCES: "choose a folder you can write to with --out",
            errno.EPERM: "choose a folder you can write to with --out",
            errno.EROFS: "choose a folder you can write to with --out",
        }.get(e.errno or 0, "check --out")
        print(f"seglab: error: cannot write {where}: {e.strerror or e}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGINT/SIGTERM stopped at a safe point (engine.stopping)
        print("seglab: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "torch.distributed" in sys.modules:  # leave a torchrun group cleanly
            from seglab.engine.distributed import cleanup

            cleanup()


def _one_line(message: str) -> str:
    """A SeglabError raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    if "Original Traceback" in message:
        last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
        return last.split("SeglabError: ", 1)[-1]
    return message


def _train(args: argparse.Namespace) -> int:
    from seglab.api import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if not overrides["data"] and not args.config and not overrides["resume"]:
        raise SeglabError("train: --data is required (a dataset folder or data.yaml), or --config / --resume")
    run = train(args.config, **overrides)
    return 128 + run.stopped if run.stopped else 0  # stopped by a signal: last.pt saved, not finished


DETECTOR_TASKS = ("instance", "detect")  # their predictors give InstanceResults


def _load(args: argparse.Namespace):
    """--weights as seglab.load gives it: the task's predictor, for a checkpoint or an export."""
    from seglab.api import load

    return load(args.weights, device=args.device, amp=args.amp, trust=args.trust_weights)


def _val(args: argparse.Namespace) -> int:
    from seglab.engine.distributed import current
    from seglab.engine.runs import next_run_dir
    from seglab.metrics import format_table

    model = _load(args)
    data = args.data or model.config.get("data")
    if not data:
        raise SeglabError(f"val: {args.weights} does not say which data it was trained on; pass --data")
    detector = model.card.task in DETECTOR_TASKS
    if detector and (args.tta or args.slide):
        raise SeglabError("val: --tta and --slide are for semantic models; drop them for a detector")
    spec, samples = _val_samples(model, data, args)
    common = dict(split=args.split, batch=args.batch, workers=args.workers, limit=args.limit,
                  data_cache=args.data_cache or model.config.get("data_cache"), **_holdout_of(model))  # fmt: skip
    predict = {} if detector else {"tta": args.tta, "slide": args.slide}
    if detector:
        evaluation = model.evaluate(data, **common)
    else:
        evaluation = model.evaluate(data, strict_data=args.strict_data, **predict, **common)
    if not current().is_main:  # under torchrun, rank 0 reports
        return 0
    if detector:
        from seglab.instance.evaluate import format_ap_table

        print(format_ap_table(evaluation.metrics))
    else:
        print(format_table(evaluation.metrics))
        for message in evaluation.skipped:
            print(f"val: skipped an unreadable sample: {message}")
    out = Path(args.out) if args.out else next_run_dir("runs/val", args.name, exist_ok=False)
    metrics = {**_measured(model, data, args, evaluation.metrics["num_images"]), **evaluation.metrics}
    files = {"metrics.json": metrics, **({"predictions.json": evaluation.results} if detector else {})}  # COCO results
    scores = model.scores(evaluation)
    wrote = _write_val(out, files, model, scores, spec, samples, predict)
    shown = ", ".join(f"{name} {100 * v:.2f}" for name, v in scores.headline.items() if v is not None)
    print(f"val: {metrics['num_images']} {args.split} images: {shown}; wrote {', '.join(str(p) for p in wrote)}")
    return 0


def _write_val(out: Path, files: dict, model, scores, spec, samples: list, predict: dict) -> list[Path]:
    """The JSON ``files``, the val pictures and report.html in ``out``; the files a user opens."""
    import json

    from seglab.engine.report import write_pictures, write_report
    from seglab.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2 if name == "metrics.json" else None))
    write_pictures(out, model, samples, spec, scores, **predict)
    metrics = files["metrics.json"]
    facts = {k.replace("_", " "): str(v) for k, v in metrics.items() if k in MEASURED and v not in (None, False)}
    title = f"seglab val: {Path(metrics['weights']).name} on {metrics['split']}"
    return [*(out / name for name in files), write_report(out, title=title, facts=facts, scores=scores)]


MEASURED = ("weights", "data", "split", "num_images", "img_size", "tta", "slide", "limit", "seglab_version")


def _measured(model, data: str, args: argparse.Namespace, num_images: int) -> dict[str, typing.Any]:
    """What metrics.json says it measured (MEASURED), before the figures."""
    from seglab import __version__

    values = (str(Path(args.weights).absolute()), str(data), args.split, num_images, model.card.img_size,
              args.tta, args.slide, args.limit, __version__)  # fmt: skip
    return dict(zip(MEASURED, values, strict=True))


def _val_samples(model, data: str, args: argparse.Namespace) -> tuple[typing.Any, list]:
    """(the dataset spec, the samples val scores); warns when some are also training images, so the
    scores overstate how the model does on images it has not seen."""
    import os

    from seglab.data import ShardSpec, get_split, resolve_dataset
    from seglab.data.check import shared_images

    cache = args.data_cache or model.config.get("data_cache")
    spec = resolve_dataset(data, cache_dir=cache, progress=False, task=model.card.task)
    if isinstance(spec, ShardSpec):
        return spec, []
    holdout = _holdout_of(model)
    fraction, seed = float(holdout["val_fraction"]), int(holdout["seed"])
    samples = get_split(spec, args.split, val_fraction=fraction, seed=seed)[: args.limit]
    if args.split == "train" or "train" not in spec.splits or os.environ.get("RANK", "0") != "0":
        return spec, samples
    shared = shared_images(samples, get_split(spec, "train", val_fraction=fraction, seed=seed))
    if shared:
        image, other = shared[0]
        print(
            f"val: warning: {len(shared)} of the {len(samples)} {args.split} images are also training images "
            f"({image} is {other}{', ...' if len(shared) > 1 else ''}); these scores overstate how the model "
            "does on images it has not seen"
        )
    return spec, samples


def _holdout_of(model) -> dict[str, float | int]:
    """The val hold-out the model was trained with (a dataset without a val split is split by
    val_fraction and seed), so `seglab val` scores the images training left out, not others."""
    config = model.config
    return {"val_fraction": config.get("val_fraction", 0.1), "seed": config.get("seed", 0)}


def _predict_detector(model, sources: list, out: Path, args: argparse.Namespace) -> int:
    import json

    from seglab.engine.predictor import output_names
    from seglab.instance.predictor import DEFAULT_CONF

    if args.tta or args.slide or args.save_conf or args.img_size or args.unpainted:
        raise SeglabError(
            "predict: --tta, --slide, --save-conf, --img-size and --unpainted are for semantic models; use --conf"
        )
    conf = DEFAULT_CONF if args.conf is None else args.conf
    coco: list[dict] = []
    names = output_names(sources)
    for i, (result, name) in enumerate(_timed(model.iter_predict(sources, conf=conf, batch=args.batch), names)):
        result.save(out, alpha=args.alpha, name=name)
        file_name = result.path.name if result.path else f"image{i}"
        coco += [{**entry, "file_name": file_name} for entry in result.to_coco(image_id=i)]
    (out / "predictions.json").write_text(json.dumps(coco))
    print(f"predict: {_count(len(sources), 'image')}, {_count(len(coco), 'object')} scoring {conf:g} or more; "
          f"overlays, masks and labels in {out}; COCO results in predictions.json")  # fmt: skip
    if not coco:
        lower = "train longer" if conf <= 0.05 else f"try a lower --conf (e.g. --conf {conf / 5:g}) or train longer"
        print(f"predict: found nothing scoring {conf:g} or more in any image; {lower}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _timed(results: Iterator, names: list[str]) -> Iterator[tuple[typing.Any, str]]:
    """(result, output name) pairs, each result announced in one line as it comes: name, size, what
    was found, time."""
    start = last = time.perf_counter()
    n = 0
    for result, name in zip(results, names, strict=True):
        now = time.perf_counter()
        h, w = result.image.shape[:2]
        print(f"{result.path.name if result.path else name} {w}x{h}: {result.summary()}, {1000 * (now - last):.0f} ms")
        yield result, name
        n, last = n + 1, time.perf_counter()
    if n > 1:
        took = time.perf_counter() - start
        print(f"predict: {n} images in {took:.1f} s ({1000 * took / n:.0f} ms per image, saving included)")


def _predict(args: argparse.Namespace) -> int:
    from seglab.engine.predictor import list_sources, output_names
    from seglab.engine.runs import next_run_dir

    if not 0 <= args.alpha <= 1:
        raise SeglabError("predict: --alpha is an opacity between 0 and 1")
    if args.batch < 1:
        raise SeglabError(f"predict: --batch {args.batch}: use 1 or more")
    sources = list_sources(args.source)  # fail on a bad source before anything is written
    names = output_names(sources)
    model = _load(args)
    out = Path(args.out) if args.out else next_run_dir("runs/predict", args.name, exist_ok=False)
    if model.card.task in DETECTOR_TASKS:
        return _predict_detector(model, sources, out, args)
    if args.conf is not None:
        raise SeglabError(
            "predict: --conf is a detector's score threshold; a semantic model labels every pixel "
            "(--save-conf saves its confidence maps)"
        )
    results = model.iter_predict(
        sources, tta=args.tta, slide=args.slide, img_size=args.img_size, batch=args.batch, save_conf=args.save_conf
    )
    for result, name in _timed(results, names):
        result.save(out, save_conf=args.save_conf, alpha=args.alpha, name=name, unpainted=args.unpainted)
    print(f"predict: {_count(len(sources), 'image')}; masks in {out / 'masks'}, overlays in {out / 'overlays'}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "pack":
        return _pack(args)
    if args.data_command == "convert":
        from seglab.data.convert import convert_dataset

        result = convert_dataset(args.source, args.to, args.out, task=args.task, data_cache=args.data_cache)
        print(result.summary())
        return 0
    if args.data_command != "check":
        raise SeglabError(
            "data: choose an action: seglab data check PATH, seglab data convert SRC --to FORMAT --out DIR, "
            "or seglab data pack --data D --out F"
        )
    from seglab.data.check import check_dataset

    if args.path and args.data and args.path != args.data:
        raise SeglabError(f"data check: {args.path} or --data {args.data}? give the dataset once")
    if not (args.path or args.data):
        raise SeglabError("data check: which dataset? seglab data check PATH (or --data PATH)")
    report = check_dataset(args.path or args.data, task=args.task)
    print(report.format())
    return 0 if report.ok else 2  # what train would refuse: the same status as any user error


def _pack(args: argparse.Namespace) -> int:
    from seglab.data.shards import INDEX, pack_dataset

    spec = pack_dataset(
        args.data,
        args.out,
        shard_size=args.shard_size,
        max_bytes=args.max_bytes,
        limit=args.limit,
        data_cache=args.data_cache,
    )
    wrote = ", ".join(
        f"{sum(s.count for s in v)} {split} samples in {len(v)} shard(s)" for split, v in spec.shards.items()
    )
    print(f"data pack: {wrote}; wrote {Path(args.out) / INDEX}; read them with --data {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from seglab.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs)
    return 0


def _models(args: argparse.Namespace) -> int:
    from seglab.models import list_encoders, list_models

    print(
        _table(
            ["architecture", "default encoder", "description"],
            [[m.name, m.default_encoder, m.description] for m in list_models()],
        )
    )
    print()
    print(_table(["encoder", "from", "ImageNet weights"], [[e.name, e.source, e.note] for e in list_encoders()]))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines)


def _export(args: argparse.Namespace) -> int:
    from seglab.deploy.export import export

    export(
        args.weights,
        format=args.format,
        out=args.out,
        dynamic=args.dynamic,
        dynamic_batch=args.dynamic_batch,
        half=args.half,
        img_size=args.img_size,
        batch=args.batch,
        opset=args.opset,
        data=args.data,
        check_images=args.check_images,
        trust=args.trust_weights,
    )
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from seglab.deploy.quantize import quantize

    quantize(
        args.weights,
        backend=args.backend or ("pytorch" if args.qat else "onnxruntime"),
        qat=args.qat,
        epochs=args.epochs,
        lr=args.lr,
        resume=args.resume,
        data=args.data,
        calib=args.calib,
        method=args.method,
        quant_format=args.quant_format,
        out=args.out,
        report=args.report,
        limit=args.limit,
        data_cache=args.data_cache,
        trust=args.trust_weights,
    )
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from seglab.deploy.benchmark import FORMATS, benchmark, format_table, write_table
    from seglab.engine.runs import next_run_dir

    for flag in ("rounds", "calib", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SeglabError(f"benchmark: --{flag} {value}: use 1 or more")
    out = Path(args.out) if args.out else next_run_dir("runs/benchmark", args.name, exist_ok=False)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SeglabError(f"benchmark: --out {out} is not an empty folder; give a new one (nothing is overwritten)")
    if args.json and Path(args.json).exists():
        raise SeglabError(f"benchmark: --json {args.json} exists; give a new file (nothing is overwritten)")
    rows = benchmark(
        args.weights, out, data=args.data, split=args.split, limit=args.limit,
        formats=tuple(args.formats or FORMATS), rounds=args.rounds, calib=args.calib, data_cache=args.data_cache,
        trust=args.trust_weights,
    )  # fmt: skip
    path = write_table(rows, out, args.weights, args.json)
    print(format_table(rows, args.weights))
    print(f"benchmark: table in {path}" + (f" and {args.json}" if args.json else ""))
    return 0


def _gen(args: argparse.Namespace) -> int:
    import json

    from seglab.engine.runs import next_run_dir

    if args.gen_command is None:
        raise SeglabError("gen: choose an action: seglab gen train | sample | augment | eval (see seglab gen --help)")
    if args.gen_command == "train":
        from seglab.gen import GenConfig, train_generator

        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenConfig)}
        run = train_generator(args.config, **overrides)
        return 128 + run["stopped"] if run["stopped"] else 0
    for flag in ("n", "batch"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SeglabError(f"gen {args.gen_command}: --{flag} {value}: use 1 or more")
    if args.gen_command == "sample":
        from seglab.gen.sample import sample_folder

        written = sample_folder(
            args.weights, args.masks, args.out, n=args.n, batch=args.batch, device=args.device, seed=args.seed,
            trust=args.trust_weights, truncation=args.truncation, mixing_grid=args.mixing_grid,
            crossover=args.crossover,
        )  # fmt: skip
        print(f"gen sample: {len(written)} image(s) in {args.out}")
        return 0
    if args.gen_command == "augment":
        from seglab.gen.sample import augment

        if args.paste < 0:
            raise SeglabError(f"gen augment: --paste {args.paste}: use 0 or more")
        augment(
            args.weights, args.out, data=args.data, n=args.n, rare=args.rare, paste=args.paste, with_real=args.real,
            batch=args.batch, device=args.device, seed=args.seed, data_cache=args.data_cache,
            trust=args.trust_weights,
        )  # fmt: skip
        return 0
    from seglab.gen.evaluate import evaluate_generator, format_report

    report = evaluate_generator(
        args.weights, segmenter=args.segmenter, data=args.data, split=args.split, limit=args.limit,
        batch=args.batch, device=args.device, seed=args.seed, inception_weights=args.inception_weights,
        trust=args.trust_weights,
    )  # fmt: skip
    print(format_report(report))
    out = Path(args.out) if args.out else next_run_dir("runs/gen_eval", args.name, exist_ok=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"gen eval: wrote {out / 'metrics.json'}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from seglab.deploy.prune_command import run

    return run(args)


def _serve(args: argparse.Namespace) -> int:
    from seglab.serve.command import run

    return run(args)


COMMANDS = {
    "train": _train,
    "val": _val,
    "predict": _predict,
    "data": _data,
    "demo": _demo,
    "models": _models,
    "export": _export,
    "quantize": _quantize,
    "benchmark": _benchmark,
    "prune": _prune,
    "serve": _serve,
    "gen": _gen,
}


if __name__ == "__main__":
    sys.exit(main())
