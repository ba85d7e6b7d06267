"""Benchmark of the image-level path: teacher vs student images/s, and where an image's time goes.

Models, randomly initialised (nothing can be downloaded here; a forward's cost does not depend on
the weights), each built as image extraction builds it (`efcm.stages.extract_images`: the
backbone, the task's `ImageParams.encoder_spec`, `EncoderWithTransform`, channels_last):
  teacher       the `retfound` preset (ViT-L/16, global pool) at `--size` px (224); `--teacher-arch`
                swaps the timm arch and keeps the preset's pooling (the smoke test's vit_tiny)
  vfd, fpd      the params' student (`student`, resnet18) at `--size` px, as VFD distils it
                (backbone + linear projection to the teacher's dimension) and as FPD does (its
                frozen first `distill.fpd.shallow_stage` stages + TransScan); `student` below is
                the one `distill.method` names (fpd, else vfd)
Measured, on CUDA when there is one (else the CPU with torch threads = the usable cores):
  forward       images/s of the model alone: a uint8 (B, size, size, 3) batch fed through
                `efcm.features.embed_batches` (`_timing.model_only`) for at least `--seconds`
                after `--warmup` batches; the models in turn, `--repeats` rounds, medians
  end_to_end    images/s of `efcm.image_features.extract_images` over the synthetic fundus demo
                (`efcm demo-data --kind fundus`, `--images` of `--demo-size` px, PNG and JPEG):
                reading, decoding, the fundus crop and resize, the forward, the features h5;
                the models in turn, `--e2e-repeats` rounds, medians
  per_image_ms  where an image's time goes: read+decode and preprocess (one core, from bytes in
                memory; `efcm.images.reader.load_image`'s two steps), the forward (1 / forward
                rate) and the whole extraction (1 / end-to-end rate)
  speedup       student / teacher images/s (forward and end to end): the ratio of the medians
                above (the headline), and `_paired`, the median of each round's ratio (robust
                to a load that comes and goes between rounds); goal >= 15x (issue 16, this CPU)
  endpoint      `efcm serve` in a subprocess with an image package of that student (Retrain's
                fold heads on its features of the demo, exported for real:
                `tests.packages.build_image_package`), served by each runtime the package carries
                (torch, and ONNX Runtime FP32 / INT8 where export's parity check passed); one
                demo PNG (`--demo-size` px, 512) sent `--requests` times over REST JSON (base64),
                REST binary and gRPC with kserve's clients: p50 / p99 ms of the whole request
                (decode, fundus crop, resize, student, heads). `p50_latency_ms` is the gRPC p50 of
                the runtime a CPU node without torch serves (int8, else onnx).
GFLOPs per image: torch's flop counter (`efcm.evaluation.efficiency`). Absolute rates mean little
on a shared CPU; the ratios (one run, the models alternated) are the point. Prints one JSON
object. Usage:
  python benchmarks/image.py [--size 224] [--batch-size 8] [--repeats 5] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _timing import machine, model_only, sync

from efcm.config import EncoderParams, ExtractParams, Params, load_params, params_from_dict
from efcm.config import params_to_dict as to_dict
from efcm.evaluation.efficiency import count_params, gflops_per_patch
from efcm.image_features import extract_images, preprocess_settings
from efcm.images.decode import decode_image
from efcm.images.preprocess import preprocess
from efcm.images.reader import ImageReader, check_images, read_file
from efcm.io.image_manifest import LabelSpace, read_image_manifest
from efcm.models.encoders import EncoderWithTransform, build_backbone
from efcm.models.students import build_fpd, build_vfd
from efcm.stages import demo_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.packages
GOALS = {"speedup_min": 15.0, "speedup_applies_on": "cpu"}
PROTOCOLS = ("rest_json", "rest_binary", "grpc")


def _teacher_spec(size: int, arch: str | None) -> EncoderParams:
    """The `retfound` preset at `size` px (`arch` swapped in when given; pooling kept)."""
    spec: dict[str, Any] = {"preset": "retfound", "input_size": size}
    if arch:
        spec["arch"] = arch
    if size != 224:  # a ViT's position embedding is made for its input size
        spec["model_kwargs"] = {"img_size": size}
    return EncoderParams.model_validate(spec)


def _wrap(net: torch.nn.Module, spec: EncoderParams, params: Params) -> torch.nn.Module:
    """`net` as image extraction runs it: uint8 images in, the task's transform, channels_last."""
    model = EncoderWithTransform(net, params.image.encoder_spec(spec))
    model = model.to(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def _models(params: Params, teacher: EncoderParams) -> dict[str, dict[str, Any]]:
    """name -> {model (uint8 in), net (float in, for the flop count), spec, dim (the output's,
    the teacher's for all three)}."""
    torch.manual_seed(params.seed)
    t_net, _ = build_backbone(teacher, warn_random=False)
    dim = int(t_net.num_features)
    student = params.student
    vfd = build_vfd(student, dim, warn_random=False)
    fpd = build_fpd(student, dim, params.distill.fpd, warn_random=False)
    nets = {"teacher": (t_net, teacher), "vfd": (vfd, student), "fpd": (fpd, student)}
    return {
        name: {"model": _wrap(net, spec, params), "net": net, "spec": spec, "dim": dim}
        for name, (net, spec) in nets.items()
    }


def _forward(
    models: dict[str, dict[str, Any]], size: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    """name -> images/s of each round; the models in turn within a round (alternated)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, size, size, 3), generator=gen, dtype=torch.uint8)
    device = next(models["teacher"]["model"].parameters()).device
    x = x.to(device)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.repeats):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:  # warm-up once: later rounds find the kernels and buffers made
            rate, _ = model_only(models[name]["model"], x, args.seconds, args.warmup * (rep == 0))
            rates[name].append(rate)
    return rates


def _end_to_end(
    models: dict[str, dict[str, Any]],
    manifest: Path,
    params: Params,
    args: argparse.Namespace,
    tmp: Path,
) -> tuple[dict[str, list[float]], int]:
    """(name -> images/s of each `extract_images` run over the demo, images per run)."""
    images = read_image_manifest(
        manifest,
        LabelSpace(params.image.classes, params.image.multi_label, params.image.none_label),
    )
    reader = ImageReader(params.image, images.base_dir)
    extract = ExtractParams(batch_size=args.batch_size, num_workers=args.workers)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.e2e_repeats):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            model = models[name]["model"]
            attrs = {"encoder": name, "preprocess": preprocess_settings(params.image)}
            t0 = time.perf_counter()
            rows = extract_images(
                model, images, reader, tmp / f"e2e-{name}", extract, attrs, overwrite=True
            )
            sync(next(model.parameters()).device)
            seconds = time.perf_counter() - t0
            check_images(rows, "benchmark extract", "any")  # a rate of failed images is no rate
            rates[name].append(len(images.images) / seconds)
    return rates, len(images.images)


def _per_image(manifest: Path, params: Params, repeats: int) -> dict[str, Any]:
    """Median ms per image of decoding and of preprocessing the demo's images (one core, the
    files' bytes in memory: `load_image`'s two steps apart), over `repeats` passes."""
    p = params.image
    images = read_image_manifest(manifest, LabelSpace(p.classes, p.multi_label, p.none_label))
    data = [(e.uri, read_file(e.uri, base_dir=images.base_dir)) for e in images.images]
    decode_ms, prep_ms = [], []
    for _ in range(repeats):
        t_dec = t_pre = 0.0
        for uri, blob in data:
            t0 = time.perf_counter()
            img = decode_image(blob, uri, max_pixels=p.max_pixels, min_side=p.min_side)
            t1 = time.perf_counter()
            preprocess(img, p, uri)
            t_dec, t_pre = t_dec + t1 - t0, t_pre + time.perf_counter() - t1
        decode_ms.append(1000 * t_dec / len(data))
        prep_ms.append(1000 * t_pre / len(data))
    suffixes = sorted({Path(uri).suffix.lower() for uri, _ in data})
    return {
        "images": len(data),
        "formats": suffixes,
        "mean_file_kb": round(sum(len(b) for _, b in data) / len(data) / 1024, 1),
        "decode_ms": round(statistics.median(decode_ms), 3),
        "preprocess_ms": round(statistics.median(prep_ms), 3),
    }


def _summary(
    entry: dict[str, Any], fwd: list[float], e2e: list[float], size: int
) -> dict[str, Any]:
    spec: EncoderParams = entry["spec"]
    f, e = statistics.median(fwd), statistics.median(e2e)
    return {
        "arch": spec.arch,
        "preset": spec.preset,
        "input_size": size,
        "feature_dim": entry["dim"],
        "params": count_params(entry["net"]),
        "gflops_per_image": round(gflops_per_patch(entry["net"], size), 4),
        "forward_images_per_s": round(f, 3),
        "forward_images_per_s_runs": [round(r, 3) for r in fwd],
        "end_to_end_images_per_s": round(e, 3),
        "end_to_end_images_per_s_runs": [round(r, 3) for r in e2e],
        "forward_ms_per_image": round(1000 / f, 3),
        "end_to_end_ms_per_image": round(1000 / e, 3),
    }


def _round_ratios(s: dict[str, Any], t: dict[str, Any]) -> dict[str, list[float]]:
    """Student over teacher images/s in each round, forward and end to end."""
    return {
        what: [a / b for a, b in zip(s[f"{key}_runs"], t[f"{key}_runs"], strict=True)]
        for what, key in (
            ("forward", "forward_images_per_s"),
            ("end_to_end", "end_to_end_images_per_s"),
        )
    }


def _speedups(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each student's images/s over the teacher's (forward and end to end): the ratio of the
    medians, and the median of the rounds' ratios (`_paired`: a student's round and the
    teacher's run next to each other, so a load that comes and goes between rounds cancels)."""
    t = models["teacher"]
    out: dict[str, Any] = {}
    for name in ("vfd", "fpd"):
        s = models[name]
        rounds = _round_ratios(s, t)
        out[name] = {
            "forward": round(s["forward_images_per_s"] / t["forward_images_per_s"], 3),
            "end_to_end": round(s["end_to_end_images_per_s"] / t["end_to_end_images_per_s"], 3),
            "forward_paired": round(statistics.median(rounds["forward"]), 3),
            "end_to_end_paired": round(statistics.median(rounds["end_to_end"]), 3),
            "forward_paired_runs": [round(x, 3) for x in rounds["forward"]],
            "params_ratio": round(t["params"] / s["params"], 3),
            "flop_ratio": round(t["gflops_per_image"] / s["gflops_per_image"], 3),
        }
    return out


def _image_inputs(png: bytes):
    """`inputs(binary)` for `serving.request_latencies`: one encoded image, raw bytes (binary) or
    base64 text (REST JSON)."""
    import base64

    import numpy as np
    from kserve import InferInput

    text = base64.b64encode(png).decode("ascii")

    def inputs(binary: bool) -> list[Any]:
        inp = InferInput("image", [1], "BYTES")
        value = png if binary else text
        inp.set_data_from_numpy(np.array([value], dtype=np.object_), binary_data=binary)
        return [inp]

    return inputs


def _endpoint(
    models: dict[str, dict[str, Any]],
    student: str,
    manifest: Path,
    params: Params,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    """The image endpoint's request latency per runtime and protocol (see the docstring)."""
    from serving import request_latencies

    from efcm.errors import PackageError
    from efcm.models.meta import read_package_meta
    from efcm.runtimes import carried
    from tests.packages import build_image_package

    net = models[student]["net"]
    fpd = params.distill.fpd if student == "fpd" else None
    if args.quick:  # a handful of patients: two folds
        params = params.model_copy(update={"image": params.image.model_copy(update={"folds": 2})})
    refused = None
    try:
        package = build_image_package(
            tmp / "pkg", params, manifest, net, runtimes=("onnx", "int8"), fpd=fpd
        )
    except PackageError as err:  # the INT8 student missed parity: serve what passed
        refused = str(err)
        package = build_image_package(
            tmp / "pkg", params, manifest, net, runtimes=("onnx",), fpd=fpd
        )
    png = sorted(manifest.parent.rglob("*.png"))[0]
    data = png.read_bytes()
    img = decode_image(data, png.name, max_pixels=params.image.max_pixels, min_side=1)
    runtimes = carried(read_package_meta(package))
    out: dict[str, Any] = {}
    for rt in runtimes:
        out[rt] = request_latencies(
            package,
            args.requests,
            tmp / f"server-{rt}.log",
            _image_inputs(data),
            env={"EFCM_RUNTIME": rt},
        )
    cpu = next((r for r in ("int8", "onnx") if r in out), "torch")
    return {
        "p50_latency_ms": out[cpu]["grpc"]["p50_ms"],
        "p50_runtime": cpu,
        "p50_protocol": "grpc",
        "image": {"file": png.name, "px": list(img.shape[1::-1]), "bytes": len(data)},
        "image_px": int(max(img.shape[:2])),
        "package": f"retrain fold heads ({params.image.folds}) on the {student} student",
        "int8_refused": refused,
        "runtimes": out,
    }


def _params(args: argparse.Namespace) -> Params:
    """The params file with the benchmark's size: the preprocessed image and the student's
    input are `--size` px (the demo's images are `--images` of `--demo-size` px)."""
    data = to_dict(load_params(args.params))
    data["image"]["size"] = args.size
    data["image"]["demo"].update(images=args.images, size=args.demo_size)
    data["student"]["input_size"] = args.size
    return params_from_dict(data, args.params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--size", type=int, default=224, help="px the models see (and image.size)")
    ap.add_argument("--teacher-arch", help="a timm arch instead of the preset's ViT-L/16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=6.0, help="min timing of a forward round")
    ap.add_argument("--warmup", type=int, default=1, help="forward warm-up batches (round 1)")
    ap.add_argument("--repeats", type=int, default=5, help="forward rounds (models alternated)")
    ap.add_argument("--e2e-repeats", type=int, default=3, help="end-to-end rounds")
    ap.add_argument("--images", type=int, default=32, help="demo fundus images")
    ap.add_argument("--demo-size", type=int, default=512, help="demo images' side, px")
    ap.add_argument("--workers", type=int, default=0, help="extract.num_workers end to end")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: usable cores)")
    ap.add_argument("--requests", type=int, default=30, help="endpoint requests per protocol")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.size, args.batch_size, args.seconds, args.repeats, args.e2e_repeats = 64, 4, 0.2, 2, 1
        args.images, args.demo_size, args.requests = 16, 96, 3
        args.teacher_arch = args.teacher_arch or "vit_tiny_patch16_224"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores or 1)

    t_start = time.perf_counter()
    result = _run(args)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; the JSON object."""
    params = _params(args)
    host = machine()
    teacher = _teacher_spec(args.size, args.teacher_arch)
    models = _models(params, teacher)
    with tempfile.TemporaryDirectory(prefix="efcm-bench-image-") as tmp_s:
        tmp = Path(tmp_s)
        manifest = demo_data(tmp / "demo", params, kind="fundus")
        fwd = _forward(models, args.size, args)
        e2e, n_images = _end_to_end(models, manifest, params, args, tmp)
        per_image = _per_image(manifest, params, max(1, args.e2e_repeats))
        student = "fpd" if params.distill.method == "fpd" else "vfd"
        endpoint = _endpoint(models, student, manifest, params, args, tmp)
    summary = {name: _summary(models[name], fwd[name], e2e[name], args.size) for name in models}
    speedups = _speedups(summary)
    device = host["device"]
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "benchmark": "image",
        "machine": host,
        "weights": "random init: throughput does not depend on the weights' values",
        "data": {
            "demo": "efcm demo-data --kind fundus (synthetic, PNG and JPEG)",
            "images": n_images,
            "demo_size": args.demo_size,
            "image_size": args.size,
            "extract_workers": args.workers,
        },
        "batch_size": args.batch_size,
        "forward_min_seconds": args.seconds,
        "repeats": {"forward": args.repeats, "end_to_end": args.e2e_repeats},
        "student": student,
        "student_teacher_speedup": speedups[student]["forward"],
        "student_teacher_speedup_paired": speedups[student]["forward_paired"],
        "student_teacher_speedup_end_to_end": speedups[student]["end_to_end"],
        "speedups": speedups,
        "goals": GOALS,
        "goals_met": {
            "speedup": speedups[student]["forward"] >= GOALS["speedup_min"]
            if device == GOALS["speedup_applies_on"]
            else None,
        },
        "per_image_ms": {
            **per_image,
            "forward_ms": {name: summary[name]["forward_ms_per_image"] for name in summary},
            "end_to_end_ms": {name: summary[name]["end_to_end_ms_per_image"] for name in summary},
        },
        "endpoint": endpoint,
        "models": summary,
    }


if __name__ == "__main__":
    main()
