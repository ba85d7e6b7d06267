"""`efcm <stage>`: the entry point of the dvc.yaml stages and of the container images.

Each command parses argv, loads params, and calls one core function. Exit status: 0 when the command
did its job (a batch with some failed slides, reported in status.csv, is a success unless
`patch.fail_on` says otherwise, or an unexpected error hit most slides), 2 for bad usage or
configuration, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from efcm import registry, stages
from efcm.config import DEMO_KINDS, ConfigError, Params, for_stage, load_params
from efcm.errors import EfcmError
from efcm.io.cache import SlideCache
from efcm.limits import RUNTIME_CHOICES

if TYPE_CHECKING:
    from efcm.training.launch import Launch

log = logging.getLogger("efcm")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _params(args: argparse.Namespace, stage: str | None = None) -> Params:
    """The whole params file validated, then only the command's sections (as a KFP component
    gets them: `efcm.config.STAGE_SECTIONS`), so that dvc and Kubeflow runs read the same.
    `stage`: the STAGE_SECTIONS key, where it is not the command's name."""
    return for_stage(load_params(args.params), stage or args.command.replace("-", "_"))


def _heatmap_size(text: str) -> int:
    """argparse type of --heatmap-size (argparse names the option in its error)."""
    from efcm.evaluation.heatmap import MAX_SIZE, MIN_SIZE, check_size

    try:
        return check_size(int(text), "the heatmap size")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {text!r}"
        ) from None


def _processes(text: str) -> int:
    """argparse type of --nproc-per-node."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes >= 1, got {text!r}")
    return int(text)


def _cache() -> SlideCache:
    """Where gs:// slides and weights are staged: EFCM_CACHE_DIR, EFCM_CACHE_MAX_BYTES."""
    return SlideCache.from_env()


def cmd_demo_data(args: argparse.Namespace) -> None:
    path = stages.demo_data(
        args.out_dir,
        _params(args, stages.demo_stage(args.kind)),
        kind=args.kind,
        n_slides=args.slides,
        n_images=args.images,
        seed=args.seed,
    )
    log.info("demo dataset: %s", path)


def cmd_patch(args: argparse.Namespace) -> None:
    stages.patch(
        args.manifest,
        args.out,
        _params(args),
        workers=args.workers,
        overwrite=args.overwrite,
        mpp_overrides=args.mpp_overrides,
        cache=_cache(),
    )


KINDS = ("slides", "image")  # efcm extract / distill --kind


def _patches_for(args: argparse.Namespace) -> None:
    """--patches goes with slides (required) and not with images (ConfigError)."""
    if args.kind == "image" and args.patches:
        raise ConfigError("--patches is for slides; --kind image reads the images themselves")
    if args.kind == "slides" and not args.patches:
        raise ConfigError("--patches (the output dir of `efcm patch`) is required for slides")


def cmd_extract(args: argparse.Namespace) -> None:
    _patches_for(args)
    if args.kind == "image":
        if args.teacher_features:
            raise ConfigError("--teacher-features is for slides with store.enabled, not images")
        stages.extract_images(
            args.manifest,
            args.out,
            _params(args, "image_extract"),
            encoder=args.encoder,
            student=args.student,
            overwrite=args.overwrite,
            cache=_cache(),
        )
        return
    stages.extract(
        args.manifest,
        args.patches,
        args.out,
        _params(args),
        encoder=args.encoder,
        student=args.student,
        teacher_features=args.teacher_features,
        overwrite=args.overwrite,
        cache=_cache(),
    )


def _under_torchrun(
    args: argparse.Namespace, check: Callable[[int], object]
) -> tuple[Launch | None, int | None]:
    """(this process's torchrun launch or None, the exit status of a relaunch or None). A plain
    process with --nproc-per-node N > 1 calls `check(N)` (to fail before launching), then runs
    this command again under torchrun with N processes and returns its exit status; under
    torchrun, ranks above 0 log warnings only (one copy of the log: rank 0's)."""
    from efcm.training.launch import Launch, torchrun

    launch = Launch.from_torchrun(os.environ)
    if launch is None and args.nproc_per_node > 1:
        check(args.nproc_per_node)
        log.info("%s: launching %d processes", args.command, args.nproc_per_node)
        return None, torchrun(args.argv, args.nproc_per_node)
    if launch is not None and launch.rank > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return launch, None


def cmd_distill(args: argparse.Namespace) -> int | None:
    """Under torchrun, every process runs the stage inside the process group (DDP); a plain
    process with --nproc-per-node N > 1 relaunches this command under torchrun. The params,
    manifest, patches and teacher features may be gs:// URIs (staged into the cache), and so may
    --out (a TrainJob's pods see no local artifacts): rank 0 uploads it when the stage ends,
    also after a failure, so that a rerun resumes from its checkpoint."""
    from efcm.io.transfer import local_inputs, local_output
    from efcm.training.launch import check_world

    _patches_for(args)
    image = args.kind == "image"
    cache = _cache()
    inputs = {"params": args.params, "manifest": args.manifest}
    if not image:
        inputs["patches"] = args.patches
    inputs["teacher_features"] = args.teacher_features
    staged = local_inputs(inputs, cache)
    params = for_stage(load_params(staged["params"]), "image_distill" if image else "distill")
    if image:
        from efcm.training.image_distill import check_image_method

        check_image_method(params.distill)  # before any process is launched
    launch, status = _under_torchrun(args, lambda n: check_world(params.distill.batch_size, n))
    if status is not None:
        return status
    from efcm.training.distributed import process_group

    rank = launch.rank if launch is not None else 0
    work = cache.root / "distill-out" / str(os.getpid())
    with process_group(launch), local_output(args.out, work, upload=rank == 0) as out:
        if image:
            teacher = staged["teacher_features"]
            stages.distill_images(
                staged["manifest"], out, params, teacher_features=teacher, cache=cache
            )
            return None
        stages.distill(
            staged["manifest"],
            staged["patches"],
            staged["teacher_features"],
            out,
            params,
            cache=cache,
        )
    return None


def _image(args: argparse.Namespace) -> bool:
    """--kind image: the command reads the `image_<command>` params sections (STAGE_SECTIONS)."""
    return args.kind == "image"


def _refuse(args: argparse.Namespace, kind: str, *flags: str) -> None:
    """ConfigError when a flag of the other kind is given (e.g. --teacher-mil with images)."""
    given = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_"), None)]
    if given:
        raise ConfigError(f"{', '.join(given)}: not for --kind {kind}")


def cmd_splits(args: argparse.Namespace) -> None:
    params = _params(args, "image_splits" if _image(args) else "splits")
    stages.splits(args.manifest, args.out, params, features_dir=args.features, kind=args.kind)


def cmd_train_mil(args: argparse.Namespace) -> None:
    params = _params(args, "image_train_mil" if _image(args) else "train_mil")
    stages.train_mil(
        args.manifest, args.features, args.splits, args.out, params, kind=args.kind,
        cache=_cache() if _image(args) else None,
    )  # fmt: skip


def cmd_strategy(args: argparse.Namespace) -> int | None:
    """ETC may run as several processes: under torchrun, or relaunched there by
    --nproc-per-node N > 1 (see `_under_torchrun`). --kind image: an image strategy, one
    process."""
    if _image(args):
        _refuse(args, "image", "--patches", "--teacher-features", "--teacher-mil")
        if args.nproc_per_node > 1:
            raise ConfigError("--nproc-per-node: the image strategies run as one process")
        stages.image_strategy(
            args.name,
            args.manifest,
            args.splits,
            args.out,
            _params(args, "image_strategy"),
            cache=_cache(),
            **{k: getattr(args, k) for k in registry.IMAGE_INPUTS},
        )
        return None
    _refuse(args, "slides", "--teacher-heads")
    params = _params(args)
    launch, status = _under_torchrun(
        args, lambda n: stages.check_strategy_processes(args.name, params, n)
    )
    if status is not None:
        return status
    from efcm.training.distributed import process_group
    from efcm.training.strategies import ETC_COLLECTIVE_TIMEOUT

    with process_group(launch, ETC_COLLECTIVE_TIMEOUT):
        stages.strategy(
            args.name,
            args.manifest,
            args.splits,
            args.out,
            params,
            cache=_cache(),
            **{k: getattr(args, k) for k in registry.INPUTS},
        )
    return None


def cmd_evaluate(args: argparse.Namespace) -> None:
    if _image(args):
        _refuse(args, "image", "--teacher-mil", "--patches", "--masks")
        teacher, flag = args.teacher_heads, "--teacher-heads (the image teacher probe)"
    else:
        _refuse(args, "slides", "--teacher-heads")
        teacher, flag = args.teacher_mil, "--teacher-mil (the output of `efcm train-mil`)"
    if not teacher:
        raise ConfigError(f"{flag} is required")
    stages.evaluate(
        teacher,
        args.strategy,
        args.out,
        _params(args, "image_evaluate" if _image(args) else "evaluate"),
        manifest=args.manifest,
        student=args.student,
        patches_dir=args.patches,
        masks_dir=args.masks,
        cache=_cache(),
        kind=args.kind,
    )


def cmd_export(args: argparse.Namespace) -> None:
    if _image(args):
        _refuse(args, "image", "--patches", "--teacher-features")
        missing = [f for f in ("student_features", "splits") if not getattr(args, f)]
        if missing:
            flags = ", ".join("--" + f.replace("_", "-") for f in missing)
            raise ConfigError(f"{flags}: required with --kind image")
        out = stages.export_images(
            args.student,
            args.strategy,
            args.out,
            _params(args, "image_export"),
            metrics_path=args.metrics,
            student_features=args.student_features,
            manifest=args.manifest,
            splits_path=args.splits,
            cache=_cache(),
        )
        log.info("package: %s", out)
        return
    _refuse(args, "slides", "--student-features", "--splits")
    if not args.patches:
        raise ConfigError("--patches is required (the output dir of `efcm patch`)")
    out = stages.export(
        args.student,
        args.strategy,
        args.out,
        _params(args),
        metrics_path=args.metrics,
        patches_dir=args.patches,
        manifest=args.manifest,
        teacher_features=args.teacher_features,
        cache=_cache(),
    )
    log.info("package: %s", out)


def cmd_report(args: argparse.Namespace) -> None:
    page = stages.report(
        args.patches,
        args.strategy,
        args.package,
        args.out,
        _params(args),
        evaluation_dir=args.evaluation,
        gate_dir=args.gate,
    )
    log.info("report: %s", page)


def cmd_gate(args: argparse.Namespace) -> None:
    if bool(args.package) == bool(args.evaluation):
        raise ConfigError("give --package (an exported package) or --evaluation (an image run)")
    if args.evaluation:
        decision = stages.gate_evaluation(args.evaluation, args.out, _params(args, "image_gate"))
    else:
        decision = stages.gate(args.package, args.out, _params(args))
    print(json.dumps({"promote": decision.promote, "reason": decision.reason}))


def cmd_predict(args: argparse.Namespace) -> None:
    from efcm.inference import predict_slide
    from efcm.limits import RuntimeSettings
    from efcm.runtimes import load_runtime

    settings = RuntimeSettings.from_env(
        runtime=args.runtime, threads=args.threads, read_workers=args.read_workers
    )
    rt = load_runtime(args.package, settings.runtime, threads=settings.threads)
    if rt.kind == "image":
        _predict_image(args, rt)
        return
    pred = predict_slide(
        rt,
        args.slide,
        read_workers=settings.read_workers,
        mpp=args.mpp,
        heatmap=bool(args.heatmap),
        heatmap_size=args.heatmap_size,
        geojson_out=bool(args.geojson),
        gallery_k=args.gallery_k if args.gallery else 0,
        cache=_cache(),
    )
    if args.heatmap:
        Path(args.heatmap).write_bytes(pred.heatmap_png)
    if args.geojson:
        Path(args.geojson).write_bytes(pred.heatmap_geojson)
    if args.gallery:
        Path(args.gallery).write_bytes(pred.gallery_png)
    print(
        json.dumps(
            {
                "label": pred.label,
                "classes": rt.classes,
                "runtime": rt.name,
                "probabilities": [round(float(x), 6) for x in pred.probabilities],
                "n_patches": len(pred.attention),
                "attention": [round(float(x), 6) for x in pred.attention],
                "coords": pred.coords.tolist(),
                "timings": pred.timings,
            }
        )
    )


def _predict_image(args: argparse.Namespace, rt) -> None:
    """`efcm predict` with an image package: one image file (local or gs://), its preprocessing
    as the package records it, the student and the fold heads."""
    from efcm.images.reader import max_file_bytes, read_file
    from efcm.inference import image_params, predict_image

    given = [f for f in ("heatmap", "geojson", "gallery", "mpp") if getattr(args, f)]
    if given:
        flags = ", ".join("--" + f for f in given)
        raise ConfigError(f"{flags}: for slide packages; {args.package} is an image package")
    data = read_file(args.slide, cache=_cache(), max_bytes=max_file_bytes(image_params(rt)))
    pred = predict_image(rt, data, name=args.slide)
    print(
        json.dumps(
            {
                "label": pred.label,
                "classes": rt.classes,
                "multi_label": rt.multi_label,
                "runtime": rt.name,
                "probabilities": [round(float(x), 6) for x in pred.probabilities],
            }
        )
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from efcm.serving.server import main as serve

    serve(args.serve_args)


def _kind_argument(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="slides",
        help=help
        or "slides (default: params dataset, extract/distill, store), or image: an image "
        "manifest (params image, and extract or distill; one features.h5, see the README)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="efcm", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kwargs)
        p.set_defaults(fn=fn)
        if name not in ("predict", "serve"):
            p.add_argument(
                "--params", default="params.yaml", help="params file (default: ./params.yaml)"
            )
        return p

    p = add(
        "demo-data",
        cmd_demo_data,
        "write a synthetic demo dataset: slides (with tumour masks), or fundus or chest X-ray "
        "images, and its manifest.csv",
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--kind",
        choices=DEMO_KINDS,
        default="slides",
        help="slides (default; params demo_data), or fundus / cxr images (params image.demo)",
    )
    p.add_argument("--slides", type=int, help="number of slides (default: demo_data.slides)")
    p.add_argument("--images", type=int, help="number of images (default: image.demo.images)")
    p.add_argument("--seed", type=int, help="seed (default: params seed)")

    p = add(
        "patch", cmd_patch, "tissue segmentation + patch grid: DIR/patches/<id>.h5, DIR/qc/, status"
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already done")
    p.add_argument("--mpp-overrides", metavar="CSV", help="slide_id,mpp: wins over the slides' mpp")

    p = add(
        "extract",
        cmd_extract,
        "patch features (or, with --kind image, image features) with the teacher or the "
        "distilled student",
    )
    _kind_argument(p)
    p.add_argument("--manifest", required=True, help="slide manifest (--kind image: images)")
    p.add_argument("--patches", help="output dir of `efcm patch` (slides only)")
    p.add_argument("--out", required=True)
    p.add_argument("--encoder", choices=("teacher", "student"), required=True)
    p.add_argument("--student", help="student checkpoint (from distill), for --encoder student")
    p.add_argument(
        "--teacher-features",
        help="for --encoder student with store.enabled: the teacher extraction's output folder, "
        "whose patch-shard store is read instead of the slides",
    )
    p.add_argument("--overwrite", action="store_true")

    p = add(
        "distill",
        cmd_distill,
        "train the student on the cached teacher features",
        epilog="Several processes: run it under torchrun (`torchrun --nproc-per-node N [--nnodes "
        "M --rdzv-endpoint HOST:PORT] -m efcm.cli distill ...`) or give --nproc-per-node N. "
        "Each process trains a DistributedDataParallel replica (NCCL on GPUs, one GPU per "
        "process; gloo on the CPU) on an equal share of every global batch of "
        "distill.batch_size items (which must divide by the number of processes), so a step "
        "sees the same items as a single process; rank 0 writes checkpoint.pt, metrics.json and "
        "student.pt. A rerun resumes from the checkpoint, mid-epoch too "
        "(distill.checkpoint_steps), with the same or another number of processes.",
    )
    _kind_argument(p)
    p.add_argument("--manifest", required=True, help="slide manifest (--kind image: images)")
    p.add_argument("--patches", help="output dir of `efcm patch` (slides only)")
    p.add_argument(
        "--teacher-features", required=True, help="output dir of `efcm extract --encoder teacher`"
    )
    p.add_argument("--out", required=True, help="dir for student.pt and metrics.json")
    p.add_argument(
        "--nproc-per-node",
        type=_processes,
        default=1,
        metavar="N",
        help="N > 1: launch torchrun --standalone with N processes on this node (one per GPU, "
        "or gloo on the CPU) running this command (1; ignored under torchrun)",
    )

    p = add("splits", cmd_splits, "patient-level stratified k-fold splits, shared by every model")
    _kind_argument(p, "slides (default: params train_mil.folds), or image: an image manifest "
                   "(params image.folds, image.val_fraction)")  # fmt: skip
    p.add_argument("--manifest", required=True)
    p.add_argument(
        "--features",
        help="only slides extracted ok here (its status.csv); --kind image: only the images in "
        "this image extraction's features.h5",
    )
    p.add_argument("--out", required=True, help="splits JSON")

    p = add(
        "train-mil", cmd_train_mil, "train CLAM per fold on a features dir; out-of-fold predictions"
    )
    _kind_argument(p, "slides (default): CLAM; or image: the teacher's linear probe on image "
                   "features (params image.head; no MIL), the image teacher row; with "
                   "image.teacher_finetune also the teacher fine-tuned end to end on the "
                   "--manifest images into OUT/finetune")  # fmt: skip
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--out", required=True)

    strategies = "; ".join(f"{n}: {e.summary}" for n, e in registry.STRATEGIES.items())
    images = "; ".join(f"{n}: {e.summary}" for n, e in registry.IMAGE_STRATEGIES.items())
    names = tuple(dict.fromkeys((*registry.NAMES, *registry.IMAGE_NAMES)))
    p = add("strategy", cmd_strategy, "run one slide-level (or image) strategy, fold by fold")
    p.add_argument("name", choices=names, help=f"slides: {strategies}. --kind image: {images}")
    _kind_argument(p, "slides (default), or image: an image strategy (efcm.registry."
                   "IMAGE_STRATEGIES; params image, distill)")  # fmt: skip
    p.add_argument("--teacher-heads", help="image: `efcm train-mil --kind image`'s output")
    p.add_argument("--manifest", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--patches", help="output dir of `efcm patch`")
    p.add_argument("--teacher-features", help="output dir of `efcm extract --encoder teacher`")
    p.add_argument("--teacher-mil", help="train-mil output dir of the teacher")
    p.add_argument("--student", help="the distilled student (distill output dir or checkpoint)")
    p.add_argument("--student-features", help="output dir of `efcm extract --encoder student`")
    p.add_argument(
        "--nproc-per-node",
        type=_processes,
        default=1,
        metavar="N",
        help="etc only: N > 1 launches torchrun --standalone with N processes on this node (one "
        "per GPU, or gloo on the CPU) running this command; mil.etc.accumulate must divide by N "
        "(1; ignored under torchrun)",
    )

    p = add("evaluate", cmd_evaluate, "teacher vs every strategy: metrics with patient-level CIs, "
            "paired deltas, ROC points, efficiency")  # fmt: skip
    _kind_argument(p, "slides (default), or image: the teacher probe and the image strategies")
    p.add_argument("--teacher-mil", help="train-mil output dir of the teacher (slides)")
    p.add_argument("--teacher-heads", help="image: `efcm train-mil --kind image`'s output")
    p.add_argument(
        "--strategy", action="append", default=[], metavar="DIR",
        help="an output dir of `efcm strategy` (repeatable; a skipped one is left out)",
    )  # fmt: skip
    p.add_argument("--manifest", required=True, help="its case_id groups the bootstrap")
    p.add_argument("--student", help="student checkpoint: also measure teacher vs student cost")
    p.add_argument("--patches", help="with --masks: attention localisation (coords of patches)")
    p.add_argument("--masks", help="folder of ground-truth tumour masks, <slide_id>.png")
    p.add_argument("--out", required=True)

    p = add("export", cmd_export, "the deployable package: export.strategy's fold models")
    _kind_argument(p, "slides (default), or image: the package of image.export_strategy")
    p.add_argument("--student", required=True, help="the distilled student (distill output)")
    p.add_argument(
        "--strategy", action="append", required=True, metavar="DIR",
        help="an output dir of `efcm strategy` (repeatable): export.strategy's is packaged",
    )  # fmt: skip
    p.add_argument("--metrics", required=True, help="metrics.json of evaluate")
    p.add_argument("--patches", help="slides: output dir of `efcm patch` (the geometry)")
    p.add_argument(
        "--manifest",
        required=True,
        help="the slides (--kind image: the images): the runtimes' parity is checked on them",
    )
    p.add_argument(
        "--student-features",
        help="image: the student's `efcm extract --kind image` output (the preprocessing)",
    )
    p.add_argument("--splits", help="image: the splits (INT8 calibration on training images)")
    p.add_argument(
        "--teacher-features",
        help="with store.enabled: the teacher extraction's output folder, whose patch-shard store "
        "gives the parity patches instead of the slides",
    )
    p.add_argument("--out", required=True)

    p = add("report", cmd_report, "HTML page: the audit (table, ROC, gate), heatmaps and QC")
    p.add_argument("--patches", required=True, help="output dir of `efcm patch`")
    p.add_argument(
        "--strategy", action="append", required=True, metavar="DIR",
        help="an output dir of `efcm strategy` (repeatable): the exported one's heatmaps",
    )  # fmt: skip
    p.add_argument("--package", required=True, help="the exported package")
    p.add_argument("--evaluation", help="output dir of `efcm evaluate`")
    p.add_argument("--gate", help="output dir of `efcm gate`")
    p.add_argument("--out", required=True, help="the HTML file to write")

    p = add("gate", cmd_gate, "promotion gate: may the exported package be deployed?")
    p.add_argument("--package", help="the exported package (slides or images)")
    p.add_argument(
        "--evaluation",
        help="image runs without a package: the `efcm evaluate --kind image` output; the row of "
        "image.export_strategy is judged",
    )
    p.add_argument("--out", required=True, help="folder for decision.json and decision.md")

    p = add(
        "predict", cmd_predict, "predict one slide (or, with an image package, one image); JSON"
    )
    p.add_argument("package")
    p.add_argument("slide", metavar="SLIDE_OR_IMAGE", help="a slide, or an image file (local "
                   "or gs://) for an image package: PNG, JPEG, TIFF or DICOM")  # fmt: skip
    p.add_argument(
        "--heatmap", metavar="OUT.png", help="also write the attention heatmap (with its legend)"
    )
    p.add_argument(
        "--heatmap-size",
        type=_heatmap_size,
        default=1024,
        metavar="PX",
        help="the heatmap's longest side in px, 64 .. 8192 (1024)",
    )
    p.add_argument(
        "--geojson",
        metavar="OUT.geojson",
        help="also write the attention as GeoJSON tiles (one per patch) that QuPath opens",
    )
    p.add_argument("--gallery", metavar="OUT.png", help="also write the top/bottom patch gallery")
    p.add_argument("--gallery-k", type=int, default=8, help="patches per gallery row (8)")
    p.add_argument("--mpp", type=float, help="override the slide's mpp")
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        help="what runs the package (default: EFCM_RUNTIME, else auto: torch where it is "
        "installed, else the package's int8, else onnx)",
    )
    p.add_argument("--threads", type=int, help="the runtime's threads (EFCM_RUNTIME_THREADS)")
    p.add_argument("--read-workers", type=int, help="patch reading threads (EFCM_READ_WORKERS)")

    # `efcm serve`'s options are kserve's plus efcm's, parsed by efcm.serving.server (which
    # imports kserve): every argument after `serve` is handed there as is (no prefix chars here,
    # so options and --help are arguments too); `efcm serve --help` lists them.
    p = add(
        "serve",
        cmd_serve,
        "serve a package with KServe (v1 + v2 REST, gRPC): efcm serve PACKAGE_DIR [--http-port "
        "8080] [--grpc-port 8081] [--model-name efcm] [--allow-slides DIR] [kserve options]",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("serve_args", nargs="*", metavar="ARGS")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a relaunch repeats
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = args.fn(args)
    except ConfigError as err:
        print(f"efcm {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, EfcmError) as err:
        print(f"efcm {args.command}: {err}", file=sys.stderr)
        return EXIT_FAIL
    return status if isinstance(status, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
