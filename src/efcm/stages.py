"""One function per pipeline stage: paths + validated params in, files out.

The adapters (cli.py, the KFP components, dvc.yaml through the CLI) each make ONE call here, so a
stage
behaves the same wherever it runs. Stage names match params.yaml, dvc.yaml, components/ and the CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from efcm import registry
from efcm.config import DEMO_KINDS, ConfigError, Params
from efcm.io.cache import SlideCache
from efcm.io.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


def _read(manifest: str | Path, params: Params, shard: tuple[int, int] | None) -> Manifest:
    m = read_manifest(manifest, params.dataset.classes)
    if shard is None:
        return m
    from efcm.io.dataset import select_shard

    return select_shard(m, *shard)


def row_name(params: Params, strategy: str) -> str:
    """The evaluation row of a student strategy: `student.<distill.method>.<strategy>`."""
    return registry.row_name(params.distill.method, strategy)


def _store_of(params: Params, teacher_features: str | Path | None, stage: str) -> Path | None:
    """The patch-shard store a stage reads pixels from: with `store.enabled`, the one in the
    teacher extraction's output `teacher_features` (which must be given); else None (slides)."""
    if not params.store.enabled:
        return None
    from efcm.io.store import require_store

    if not teacher_features:
        raise ConfigError(
            f"store.enabled: {stage} reads its pixels from the patch-shard store of the teacher's "
            "extraction: give its output folder (--teacher-features)"
        )
    return require_store(teacher_features)


def student_checkpoint(path: str | Path) -> Path:
    """The student checkpoint: `path` itself, or `student.pt` in a distill output directory."""
    p = Path(path)
    return p / "student.pt" if p.is_dir() else p


def demo_stage(kind: str) -> str:
    """The params sections (STAGE_SECTIONS key) `efcm demo-data --kind` reads."""
    if kind not in DEMO_KINDS:
        raise ConfigError(f"unknown demo kind {kind!r}; known: {list(DEMO_KINDS)}")
    return "demo_data" if kind == "slides" else "image_demo_data"


def demo_data(
    out_dir: str | Path,
    params: Params,
    *,
    kind: str = "slides",
    n_slides: int | None = None,
    n_images: int | None = None,
    seed: int | None = None,
) -> Path:
    """Write a synthetic demo dataset: slides (default), or fundus or cxr images
    (`efcm.images.synthetic`, settings from `image.demo`); returns its manifest path."""
    if kind != "slides":
        if n_slides is not None:
            raise ConfigError(f"--slides is for --kind slides; for {kind} images use --images")
        return _image_demo_data(out_dir, params, kind, n_images, seed)
    if n_images is not None:
        raise ConfigError("--images is for --kind fundus or cxr; for slides use --slides")
    from efcm.slides.synthetic import write_demo_dataset

    d = params.demo_data
    return write_demo_dataset(
        out_dir,
        n_slides or d.slides,
        seed=params.seed if seed is None else seed,
        size=d.size,
        mpp=d.mpp,
        levels=d.levels,
        level_factor=d.level_factor,
        slides_per_case=d.slides_per_case,
        tumour_fraction=d.tumour_fraction,
        classes=params.dataset.classes[:2],
    )


def _image_demo_data(
    out_dir: str | Path, params: Params, kind: str, n_images: int | None, seed: int | None
) -> Path:
    """The fundus or cxr demo set. Its classes are `image.classes` when `image.preset` is this
    kind (a graded fundus task, a subset of the findings), else the kind's preset's."""
    from efcm.config import IMAGE_PRESETS
    from efcm.images.synthetic import DemoSpec, write_demo_images

    p = params.image
    d = p.demo
    spec = DemoSpec(
        images=n_images or d.images,
        seed=params.seed if seed is None else seed,
        classes=p.classes if p.preset == kind else IMAGE_PRESETS[kind]["classes"],
        size=d.size,
        images_per_case=d.images_per_case,
        positive_fraction=d.positive_fraction,
        none_label=p.none_label,
        unlabelled=d.unlabelled,
    )
    return write_demo_images(out_dir, kind, spec)


def patch(
    manifest: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    workers: int = 1,
    overwrite: bool = False,
    mpp_overrides: str | Path | None = None,
    shard: tuple[int, int] | None = None,
    cache: SlideCache | None = None,
) -> list[dict[str, Any]]:
    """Tissue + patch grid for every slide; `mpp_overrides` is a CSV (`slide_id, mpp`) that wins
    over the manifest and the slides' metadata; `shard` = (index, shard_size) patches only that
    shard of the manifest (see `efcm.io.dataset.select_shard`); gs:// slides are staged into
    `cache` (the adapters pass `SlideCache.from_env()`)."""
    from efcm.io.manifest import apply_mpp_overrides
    from efcm.slides.batch import check_batch, patch_manifest

    slides = _read(manifest, params, shard)
    if mpp_overrides:
        slides = apply_mpp_overrides(slides, mpp_overrides)
    rows = patch_manifest(
        slides,
        out_dir,
        params.patch,
        workers=workers,
        overwrite=overwrite,
        cache=cache,
    )
    # a shard is part of a batch: `fail_on` is applied to the whole batch, by `gather`
    return check_batch(rows, "patch", "never" if shard else params.patch.fail_on)


def _teacher_backbone(params: Params, cache: SlideCache | None) -> tuple[Any, str | None]:
    """The teacher (`efcm.models.encoders.build_backbone`) and its weights' sha256, seeded so
    that a random-init (demo) teacher is the same on every run and in every stage."""
    import torch

    from efcm.models.encoders import build_backbone

    torch.manual_seed(params.seed)
    return build_backbone(params.teacher, cache=cache)


def _encoder_model(
    params: Params,
    encoder: str,
    student: str | Path | None,
    cache: SlideCache | None,
    image: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The encoder an extraction runs (uint8 pixels in, features out: EncoderWithTransform) on
    the GPU when there is one, and the attributes its features files carry. `image` (the
    `image` params): whole images of that task (`ImageParams.encoder_spec`) instead of patches."""
    import torch

    from efcm.io.files import sha256_file
    from efcm.models.encoders import EncoderWithTransform

    if encoder == "teacher":
        net, sha = _teacher_backbone(params, cache)
        spec = params.teacher
    elif encoder == "student":
        from efcm.models.students import load_student

        if not student:
            raise ConfigError(
                "extract with the student encoder needs the student checkpoint (distill)"
            )
        ckpt = student_checkpoint(student)
        net, spec = load_student(ckpt)
        sha = sha256_file(ckpt)
    else:
        raise ConfigError(f"encoder must be 'teacher' or 'student', got {encoder!r}")
    if image is not None:
        spec = image.encoder_spec(spec)
    model = EncoderWithTransform(net, spec).to(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        model = model.cuda()
    attrs = {
        "encoder": encoder,
        "arch": spec.arch,
        "weights_sha256": sha or f"random-init (seed {params.seed})",
        "input_size": spec.input_size,
        "resize": spec.resize,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "model_kwargs": dict(spec.model_kwargs),
    }
    return model, attrs


def extract(
    manifest: str | Path,
    patches_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    encoder: str = "teacher",
    student: str | Path | None = None,
    teacher_features: str | Path | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    cache: SlideCache | None = None,
) -> list[dict[str, Any]]:
    """Features of every patched slide with the teacher, or with a distilled student checkpoint;
    `shard` = (index, shard_size) as for `patch`; gs:// slides and teacher weights are staged into
    `cache`. With `store.enabled`, the teacher's extraction also writes the patch-shard store
    (out_dir/store), and the student's reads its pixels from the store of `teacher_features`
    (the teacher extraction's output) instead of opening the slides."""
    from efcm.features import extract_manifest
    from efcm.slides.batch import check_batch

    model, attrs = _encoder_model(params, encoder, student, cache)
    read_store = None
    if encoder == "student" and params.store.enabled:
        read_store = _store_of(params, teacher_features, "student extraction")
        attrs["pixels"] = {"store": params.store.format, "quality": params.store.quality}
    rows = extract_manifest(
        model,
        _read(manifest, params, shard),
        patches_dir,
        out_dir,
        params.extract,
        attrs,
        overwrite=overwrite,
        cache=cache,
        store=params.store if encoder == "teacher" else None,
        read_store=read_store,
    )
    return check_batch(rows, "extract", "never" if shard else "all")


def _image_manifest(manifest: str | Path, params: Params) -> Any:
    """The image manifest, its labels checked against the task's classes (`image` params)."""
    from efcm.io.image_manifest import LabelSpace, read_image_manifest

    return read_image_manifest(manifest, LabelSpace.of(params.image))


def extract_images(
    manifest: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    encoder: str = "teacher",
    student: str | Path | None = None,
    overwrite: bool = False,
    cache: SlideCache | None = None,
) -> list[dict[str, Any]]:
    """Features of every image of an image manifest (`efcm extract --kind image`) with the
    teacher or a distilled student: out_dir/features.h5 and out_dir/status.csv (see
    `efcm.image_features`); gs:// images and weights are staged into `cache`. `image.fail_on`
    says when failed images fail the stage."""
    from efcm.image_features import extract_images as run
    from efcm.image_features import preprocess_settings
    from efcm.images.reader import ImageReader, check_images

    images = _image_manifest(manifest, params)
    model, attrs = _encoder_model(params, encoder, student, cache, params.image)
    attrs["preprocess"] = preprocess_settings(params.image)
    reader = ImageReader(params.image, images.base_dir, cache)
    rows = run(model, images, reader, out_dir, params.extract, attrs, overwrite=overwrite)
    return check_images(rows, "extract", params.image.fail_on)


def _image_splits(
    manifest: str | Path, params: Params, features_dir: str | Path | None
) -> dict[str, Any]:
    from efcm.training.image_heads import image_splits

    available = None
    if features_dir:
        from efcm.image_features import read_image_features

        available = set(read_image_features(features_dir).image_ids)
    p, images = params.image, _image_manifest(manifest, params)
    return image_splits(images, _space(params), p.folds, p.val_fraction, params.seed, available)


def _space(params: Params) -> Any:
    from efcm.io.image_manifest import LabelSpace

    return LabelSpace.of(params.image)


def _read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def plan_image_strategies(params: Params) -> tuple[list[str], dict[str, str]]:
    """The image strategies this run compares (`image.strategies`, `auto` resolved against
    `distill.method` by `efcm.registry.resolve_image`) and those left out, with the reason."""
    return registry.resolve_image(params.distill.method, params.image.strategies)


def image_strategy(
    name: str,
    manifest: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    cache: SlideCache | None = None,
    **inputs: str | Path | None,
) -> dict[str, Any]:
    """Run the image strategy `name` (an entry of `efcm.registry.IMAGE_STRATEGIES`) with the
    inputs its entry names (`teacher_heads`, `student` (a checkpoint or the distill output dir),
    `student_features`); gs:// images are staged into `cache` (fine-tuning reads pixels). One
    this run does not compare writes only a summary saying so (`skipped`, with the reason),
    which evaluation leaves out, as for slides."""
    from efcm.io.files import save_json
    from efcm.training.image_heads import ImageJob

    entry = registry.get(name, image=True)
    run, left_out = plan_image_strategies(params)
    if name not in run:
        return _skip(name, left_out[name], out_dir, write=True)
    if inputs.get("student"):
        inputs["student"] = student_checkpoint(inputs["student"])
    given = registry.ImageStrategyInputs.of(**inputs)
    given.require(entry)
    images = _image_manifest(manifest, params)
    job = ImageJob(given, images, _read_json(splits_path), Path(out_dir), params, cache)
    summary = {**entry.run()(job), "strategy": name}
    save_json(Path(out_dir) / "summary.json", summary)
    return summary


def _skip(name: str, reason: str, out_dir: str | Path, write: bool) -> dict[str, Any]:
    """The summary of a strategy this run does not compare (written when `write`)."""
    from efcm.io.files import save_json

    summary = {"strategy": name, "skipped": True, "reason": reason}
    if write:
        save_json(Path(out_dir) / "summary.json", summary)
    log.info("strategy %s: skipped (%s)", name, reason)
    return summary


def _table_rows(
    teacher: str | Path,
    dirs: list[str | Path],
    plan: tuple[list[str], dict[str, str]],
    out_dir: str | Path,
    params: Params,
) -> dict[str, Path]:
    """{evaluation row: output dir}: the teacher baseline (and, where `efcm train-mil --kind
    image` fine-tuned the teacher too, `teacher/finetune` as the `teacher.finetune` row) and each
    strategy of `plan` (the strategies this run compares, and those left out) among the strategy
    outputs `dirs`; writes out_dir/strategies.json (which ran, which were left out and why).

    Raises:
        ConfigError: a strategy of the plan has no output among `dirs`.
    """
    from efcm.io.files import save_json

    planned, left_out = plan
    done = read_strategy_dirs(dirs)
    for name in planned:
        if name not in done:
            raise ConfigError(f"evaluate: no output of strategy {name!r}, which this run compares")
    rows: dict[str, Path] = {registry.TEACHER_ROW: Path(teacher)}
    tuned = Path(teacher) / registry.TEACHER_FINETUNE_DIR
    if (tuned / "summary.json").is_file():  # only the image teacher is ever fine-tuned
        rows[registry.TEACHER_FINETUNE_ROW] = tuned
    rows.update({row_name(params, n): done[n] for n in planned})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_json(
        Path(out_dir) / "strategies.json",
        {"method": params.distill.method, "run": planned, "left_out": left_out},
    )
    return rows


def gate_evaluation(evaluation_dir: str | Path, out_dir: str | Path, params: Params):
    """The promotion gate on an image evaluation (`efcm gate --evaluation`): the rule of `gate`
    applied to the row of `image.export_strategy` (the strategy an image package ships) in the
    evaluation's metrics.json, for a run without a package; writes decision.json and
    decision.md, returns the `efcm.evaluation.gate.Decision`."""
    from efcm.evaluation.gate import decide, write_decision

    name = params.image.export_strategy
    metrics = _read_json(Path(evaluation_dir) / "metrics.json")
    planned = _read_json(Path(evaluation_dir) / "strategies.json")
    if name not in planned["run"]:
        raise ConfigError(
            f"image.export_strategy is {name!r}, but the evaluation in {evaluation_dir} compared "
            f"{planned['run']}"
        )
    meta = {"strategy": name, "row": row_name(params, name), "metrics": metrics}
    decision = decide(meta, params.deploy)
    write_decision(decision, out_dir)
    log.info("gate: %s", decision.reason)
    return decision


def gather(
    shards: list[str | Path], out_dir: str | Path, what: str, fail_on: str = "all"
) -> list[dict[str, Any]]:
    """Merge the shards' patch or extract output folders into `out_dir` (see
    `efcm.io.dataset.merge_outputs`), then apply `fail_on` to the whole batch, as an unsharded
    `patch` / `extract` does (a shard alone never fails the run for its failed slides)."""
    from efcm.io.dataset import merge_outputs
    from efcm.slides.batch import check_batch

    return check_batch(merge_outputs(shards, out_dir), what, fail_on)


def _torchrun(argv: list[str], out_dir: str | Path, params: Params, processes: int) -> None:
    """`efcm <argv>` as `processes` processes under torchrun (a pod with that many GPUs), with
    `params` written to out_dir/<command>-params.yaml.

    Raises:
        EfcmError: a process failed.
    """
    import yaml

    from efcm.config import params_to_dict
    from efcm.errors import EfcmError
    from efcm.training.launch import torchrun

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / f"{argv[0]}-params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params), sort_keys=False))
    if torchrun([*argv, "--params", str(params_file)], processes) != 0:
        raise EfcmError(f"{argv[0]}: the {processes} processes under torchrun failed (see the log)")


def _distill_processes(
    argv: list[str], teacher_dir: str | Path, out_dir: str | Path, params: Params, processes: int
) -> dict[str, Any]:
    """`efcm <argv> --teacher-features .. --out ..` as `processes` DDP processes under torchrun;
    returns the metrics rank 0 wrote."""
    from efcm.training.launch import check_world

    check_world(params.distill.batch_size, processes)  # fail before launching
    argv = [*argv, "--teacher-features", str(teacher_dir), "--out", str(out_dir)]
    _torchrun(argv, out_dir, params, processes)
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def distill(
    manifest: str | Path,
    patches_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    processes: int = 1,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """The distilled student (gs:// slides and student weights staged into `cache`). With
    `processes` > 1 (a pod with that many GPUs), the stage runs as that many DDP processes under
    torchrun (`efcm distill --nproc-per-node`), its params written to out_dir/distill-params.yaml;
    returns the metrics (metrics.json)."""
    if processes > 1:
        argv = ["distill", "--manifest", str(manifest), "--patches", str(patches_dir)]
        return _distill_processes(argv, teacher_dir, out_dir, params, processes)
    from efcm.training.distill import distill as run

    return run(
        read_manifest(manifest, params.dataset.classes),
        patches_dir,
        teacher_dir,
        out_dir,
        params,
        cache=cache,
    )


def distill_images(
    manifest: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    teacher_features: str | Path,
    processes: int = 1,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """The student distilled on the images of an image manifest (`efcm distill --kind image`;
    labels unused) and the teacher's image features (`teacher_features`: the output of `efcm
    extract --kind image --encoder teacher`); `processes` > 1 runs it under torchrun, as
    `distill`. Returns the metrics (metrics.json)."""
    from efcm.training.image_distill import check_image_method

    check_image_method(params.distill)  # before anything is launched
    if processes > 1:
        argv = ["distill", "--kind", "image", "--manifest", str(manifest)]
        return _distill_processes(argv, teacher_features, out_dir, params, processes)
    from efcm.image_features import read_image_features
    from efcm.training.image_distill import distill_images as run

    teacher = read_image_features(teacher_features)
    return run(_image_manifest(manifest, params), teacher, out_dir, params, cache=cache)


def splits(
    manifest: str | Path,
    out_path: str | Path,
    params: Params,
    *,
    features_dir: str | Path | None = None,
    kind: str = "slides",
) -> dict[str, Any]:
    """Patient-level folds over the slides that extracted ok (when features_dir is given).

    `kind="image"` (`efcm splits --kind image`): over the labelled images of an image manifest
    (`image.folds`, `image.val_fraction`), those in the image extraction `features_dir` when
    given; see `efcm.training.image_heads.image_splits`."""
    from efcm.io.files import save_json

    if kind == "image":
        result = _image_splits(manifest, params, features_dir)
        save_json(Path(out_path), result)
        return result
    from efcm.io.status import ok_slides
    from efcm.training.mil import make_splits

    available = ok_slides(Path(features_dir) / "status.csv") if features_dir else None
    result = make_splits(
        read_manifest(manifest, params.dataset.classes),
        params.dataset.classes,
        params.train_mil.folds,
        params.train_mil.val_fraction,
        params.seed,
        available,
    )
    save_json(Path(out_path), result)
    return result


def train_mil(
    manifest: str | Path,
    features_dir: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    kind: str = "slides",
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """The baseline on the teacher's features, per fold: CLAM on slides; with `kind="image"`
    (`efcm train-mil --kind image`), the teacher's linear probe on image features (no MIL: one
    feature per image; `efcm.training.image_heads.train_heads`, `image.head`), the image
    evaluation's teacher row. With `image.teacher_finetune` too, the teacher fine-tuned end to
    end per fold on the manifest's images (`image_finetune.finetune_teacher`, `image.finetune`)
    into out_dir/finetune, the `teacher.finetune` row; gs:// images and teacher weights are
    staged into `cache`. Returns the probe's summary."""
    folds = _read_json(splits_path)
    if kind == "image":
        from efcm.training.image_heads import read_features, train_heads

        images = _image_manifest(manifest, params)
        data = read_features(features_dir, images, _space(params))
        summary = train_heads(data, folds, out_dir, params.image.head, params.seed)
        if params.image.teacher_finetune:
            from efcm.training.image_finetune import finetune_teacher

            net, _ = _teacher_backbone(params, cache)
            spec = params.image.encoder_spec(params.teacher)
            out = Path(out_dir) / registry.TEACHER_FINETUNE_DIR
            finetune_teacher(
                images, _space(params), net, spec, folds, out, params.image, params.seed,
                cache=cache,
            )  # fmt: skip
        return summary
    from efcm.training.mil import train_mil as run

    return run(
        read_manifest(manifest, params.dataset.classes), features_dir, folds, out_dir, params
    )


def plan_strategies(params: Params) -> tuple[list[str], dict[str, str]]:
    """The strategies this run compares (`mil.strategies`, `auto` resolved against
    `distill.method` by `efcm.registry.resolve`) and those left out, with the reason."""
    return registry.resolve(params.distill.method, params.mil.strategies)


def strategy_processes(name: str, gpus: int) -> int:
    """The processes strategy `name` runs as in a pod with `gpus` GPUs: one per GPU for those
    that are `distributed` in `efcm.registry`, one for the others (one KFP task spec serves every
    strategy)."""
    return gpus if registry.get(name).distributed else 1


def check_strategy_processes(name: str, params: Params, processes: int) -> None:
    """A strategy may run as `processes` processes: one, or ETC with `mil.etc.accumulate` (the
    bags of an optimiser step, shared by the processes) a multiple of them.

    Raises:
        ConfigError: another strategy on several processes, or an accumulate that does not
            divide.
    """
    if processes == 1:
        return
    if not registry.get(name).distributed:
        several = [n for n, s in registry.STRATEGIES.items() if s.distributed]
        raise ConfigError(
            f"strategy {name!r} runs as one process; only {several} run on several "
            f"({processes} asked)"
        )
    from efcm.training.launch import check_world

    check_world(params.mil.etc.accumulate, processes, "mil.etc.accumulate")


def strategy(
    name: str,
    manifest: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    processes: int = 1,
    cache: SlideCache | None = None,
    **inputs: str | Path | None,
) -> dict[str, Any]:
    """Run the slide-level strategy `name` (an entry of `efcm.registry.STRATEGIES`) with the
    inputs its entry names (`patches`, `teacher_features`, `teacher_mil`, `student` (a checkpoint
    or the distill output dir), `student_features`); gs:// slides are staged into `cache`. A
    strategy this run does not compare writes only a summary saying so (`skipped`, with the
    reason), which evaluation leaves out. With `processes` > 1 (ETC only, a pod with that many
    GPUs), the stage runs as that many processes under torchrun (`efcm strategy etc
    --nproc-per-node`), its params written to out_dir/strategy-params.yaml; under torchrun, rank
    0 alone writes the summary."""
    from efcm.io.files import save_json
    from efcm.training.distributed import World

    entry = registry.get(name)
    run, left_out = plan_strategies(params)
    world = World.current()
    if name not in run:
        return _skip(name, left_out[name], out_dir, write=world.main)
    check_strategy_processes(name, params, max(processes, world.size))  # fail before launching
    if processes > 1:
        argv = ["strategy", name, "--manifest", str(manifest), "--splits", str(splits_path)]
        argv += ["--out", str(out_dir)]
        for key, value in inputs.items():
            if value:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        _torchrun(argv, out_dir, params, processes)
        return json.loads((Path(out_dir) / "summary.json").read_text())
    if inputs.get("student"):
        inputs["student"] = student_checkpoint(inputs["student"])
    given = registry.StrategyInputs.of(manifest, splits_path, **inputs)
    given.require(entry)
    summary = {**entry.run()(given, out_dir, params, cache=cache), "strategy": name}
    if world.main:
        save_json(Path(out_dir) / "summary.json", summary)
    return summary


def read_strategy_dirs(dirs: list[str | Path]) -> dict[str, Path]:
    """{strategy name: output dir} of strategy outputs that ran (a skipped one is left out),
    named by their own summary.json."""
    out: dict[str, Path] = {}
    for d in map(Path, dirs):
        summary = json.loads((d / "summary.json").read_text())
        name = registry.summary_strategy(summary, str(d))
        if summary.get("skipped"):
            continue
        if name in out:
            raise ConfigError(f"two outputs of strategy {name!r}: {out[name]} and {d}")
        out[name] = d
    return out


def evaluate(
    teacher_dir: str | Path,
    strategy_dirs: list[str | Path],
    out_dir: str | Path,
    params: Params,
    *,
    manifest: str | Path,
    student: str | Path | None = None,
    patches_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
    cache: SlideCache | None = None,
    kind: str = "slides",
) -> dict[str, Any]:
    """The teacher baseline (`teacher_dir`: train-mil on the teacher's features) and every
    strategy output of `strategy_dirs` that ran, on the same out-of-fold slides: one table, with
    case-level (`case_id` of the manifest) bootstrap intervals and, for each student row, the
    paired student-minus-teacher deltas. With `student`, teacher vs student cost too; with
    `patches_dir` and `masks_dir` (ground-truth tumour masks, `<slide_id>.png`), the attention
    localisation AUROC of each row (gs:// slides and weights are staged into `cache`).
    `strategies.json` says which strategies ran and which were left out, and why.

    `kind="image"` (`efcm evaluate --kind image`): the image twin, on an image manifest:
    `teacher_dir` is the teacher's linear probe (`train_mil`), the strategies those of
    `image.strategies`, every row scored image by image in the task's label space (multi-label:
    macro AUROC, F1 at validation-picked thresholds); no localisation.
    """
    from efcm.evaluation.table import evaluate as run
    from efcm.evaluation.table import localisation, measure_efficiency

    image = kind == "image"
    if image and (patches_dir or masks_dir):
        raise ConfigError("attention localisation (patches, masks) is for slides, not images")
    plan = plan_image_strategies(params) if image else plan_strategies(params)
    rows = _table_rows(teacher_dir, strategy_dirs, plan, out_dir, params)
    eff = measure_efficiency(params, student_checkpoint(student), cache=cache) if student else None
    preds = {name: d / "predictions.csv" for name, d in rows.items()}
    if image:
        images = _image_manifest(manifest, params)
        cases = {e.image_id: e.case_id for e in images.images}
        return run(preds, out_dir, params, eff, cases=cases, left_out=plan[1], space=_space(params))
    m = read_manifest(manifest, params.dataset.classes)
    loc = None
    if patches_dir and masks_dir:
        loc = {
            name: localisation(d, m, Path(patches_dir), Path(masks_dir), cache)
            for name, d in rows.items()
        }
    cases = {s.slide_id: s.case_id for s in m.slides}
    return run(preds, out_dir, params, eff, loc, cases=cases, left_out=plan[1])


def _exported_dir(name: str, strategy_dirs: list[str | Path], key: str) -> Path:
    """The output dir of strategy `name` (the params' `key`) among `strategy_dirs`, else
    ConfigError."""
    done = read_strategy_dirs(strategy_dirs)
    if name not in done:
        raise ConfigError(
            f"{key} is {name!r}, but no output of it is among {[str(d) for d in strategy_dirs]}"
        )
    return done[name]


def export(
    student: str | Path,
    strategy_dirs: list[str | Path],
    out_dir: str | Path,
    params: Params,
    *,
    metrics_path: str | Path,
    patches_dir: str | Path,
    manifest: str | Path,
    teacher_features: str | Path | None = None,
    cache: SlideCache | None = None,
) -> Path:
    """The package of `export.strategy`: its k fold models as one ensemble, with the evaluation
    row that estimates it and the patch geometry its CLAMs were trained on (from the coords files
    in `patches_dir`), and its CPU runtimes checked on the evaluation slides of `manifest` (with
    `store.enabled`, their pixels from the patch-shard store of `teacher_features`); see
    `efcm.training.export`."""
    from efcm.training.export import export_package

    metrics = json.loads(Path(metrics_path).read_text())
    return export_package(
        student_checkpoint(student),
        _exported_dir(params.export.strategy, strategy_dirs, "export.strategy"),
        out_dir,
        params,
        metrics,
        Path(patches_dir),
        read_manifest(manifest, params.dataset.classes),
        cache=cache,
        store_dir=_store_of(params, teacher_features, "export"),
    )


def export_images(
    student: str | Path,
    strategy_dirs: list[str | Path],
    out_dir: str | Path,
    params: Params,
    *,
    metrics_path: str | Path,
    student_features: str | Path,
    manifest: str | Path,
    splits_path: str | Path,
    cache: SlideCache | None = None,
) -> Path:
    """The image package of `image.export_strategy` (`efcm export --kind image`): its k fold
    models as one ensemble, with the evaluation row that estimates it and the preprocessing its
    heads were trained on (from the student's image features), its CPU runtimes checked on the
    evaluation images of `manifest`; see `efcm.training.image_export`."""
    from efcm.training.image_export import export_image_package

    return export_image_package(
        student_checkpoint(student),
        _exported_dir(params.image.export_strategy, strategy_dirs, "image.export_strategy"),
        out_dir,
        params,
        _read_json(metrics_path),
        student_features,
        _image_manifest(manifest, params),
        _read_json(splits_path),
        cache=cache,
    )


def gate(package_dir: str | Path, out_dir: str | Path, params: Params):
    """The promotion gate on an exported package (its strategy and the metrics of the evaluation
    row it was exported with): `decision.json` and `decision.md` in `out_dir`; returns the
    `efcm.evaluation.gate.Decision` (not promoting is a result, not an error)."""
    from efcm.evaluation.gate import decide, write_decision

    meta = json.loads((Path(package_dir) / "model.json").read_text())
    decision = decide(meta, params.deploy)
    write_decision(decision, out_dir)
    log.info("gate: %s", decision.reason)
    return decision


def report(
    patches_dir: str | Path,
    strategy_dirs: list[str | Path],
    package_dir: str | Path,
    out: str | Path,
    params: Params,
    *,
    evaluation_dir: str | Path | None = None,
    gate_dir: str | Path | None = None,
) -> Path:
    """The run's HTML page (see `efcm.evaluation.report`): the evaluation table with the paired
    deltas, the ROC curves, the gate's verdict and the efficiency figures, then the exported
    strategy's out-of-fold attention heatmaps over the patching QC thumbnails, and every slide's
    status."""
    from efcm.evaluation.report import html_report

    meta = json.loads((Path(package_dir) / "model.json").read_text())
    mil_dir = read_strategy_dirs(strategy_dirs)[meta["strategy"]]
    return html_report(
        patches_dir,
        mil_dir,
        out,
        params.dataset.classes,
        evaluation_dir=evaluation_dir,
        gate_dir=gate_dir,
    )
