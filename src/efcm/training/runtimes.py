"""The package's CPU runtimes, written and checked at export: the student and the CLAM ensemble as
ONNX graphs (FP32), the student statically quantized to INT8, and the parity of each against the
torch FP32 model that was evaluated, measured on the evaluation slides.

- `student.onnx`: the package's encoder as the torch runtime runs it: uint8 patches (B, S, S, 3)
  in, the input transform (crop / resize, normalisation) inside the graph, features out; for a
  package with one student per fold (ETC), the k students side by side. Dynamic batch.
- `clam.onnx`: the fold ensemble of CLAMs: a bag (N, D) -> class probabilities (C,) and attention
  (N,), the members' mean inside the graph. Dynamic N. Both graphs are torch.onnx's dynamo export
  (opset 18).
- `student_int8.onnx`: ONNX Runtime's static quantizer, QDQ format, weights INT8 symmetric per
  output channel with a 7-bit range (`reduce_range`), activations UINT8 per tensor (MinMax
  calibration) on `export.calibration_patches` patches drawn from the training slides (a fixed
  sample). Why 7 bits: x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply U8 x S8 with
  VPMADDUBSW, whose 16-bit intermediate sums can saturate with full-range weights (a published
  ResNet-50 lost 6 points that way on AVX2-only CPUs); 7-bit weights cannot saturate it, and VNNI
  CPUs run them at the same speed. So the INT8 package is correct on every x86 node, not only on
  the export node. The CLAM head stays FP32 (it is a few small matrix products per slide).

Parity (`model.json["runtimes"][name]["parity"]`), per runtime against torch FP32 on the CPU, over
every evaluation slide (the slides the strategy scored), up to `export.parity_max_patches` patches
of each (evenly spaced over its grid; a slide's probabilities are those of that bag in every
runtime, so the comparison is paired): the minimum and mean feature cosine over the patches, the
largest absolute class-probability difference over the slides, and how many slides get the same
predicted label. ONNX FP32 must reach a feature cosine >= 0.999; INT8 a cosine >= 0.99, every
probability within 0.02 and the same label on every sample whose call that tolerance cannot
flip: `same_label` counts every sample, `same_label_decided` those whose torch probabilities are
further than 0.02 from the call's boundary (`PackageFacts.boundary_distance`: a class
threshold, or the tie of the two most probable classes); a sample within it may change its call
by a difference the rule allows, and `near_boundary` says how many there were. Export refuses a
runtime that misses them (a `PackageError` with the figures), so a package never carries one that
was not shown to match. The bf16 autocast of the torch runtime on CPUs with native bf16 is
measured the same way (on an export node whose CPU has it) and used by the server only where it
passed.

An image package (`efcm.training.image_export`) is measured the same way on its evaluation
images, each a bag of one (`ParitySource`: the samples, the calibration pixels, their unit);
its head graph is `head.onnx` (the fold heads), and a multi-label package's label is its set of
called classes (`PackageFacts.label_of`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from efcm.errors import PackageError
from efcm.features import embed_batches
from efcm.io.cache import SlideCache
from efcm.io.manifest import Manifest, SlideEntry
from efcm.io.store import read_store_meta
from efcm.models.package import Package
from efcm.runtimes import INT8, ONNX, TORCH, cosine_rows, has_vnni
from efcm.runtimes.onnx_runtime import (
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_INPUT,
    HEAD_OUTPUTS,
    OnnxRuntime,
)
from efcm.runtimes.torch_runtime import cpu_bf16_native
from efcm.slides.patches import open_patches
from efcm.slides.patching import read_coords

log = logging.getLogger(__name__)

STUDENT_ONNX, HEAD_ONNX, STUDENT_INT8 = "student.onnx", "clam.onnx", "student_int8.onnx"
IMAGE_HEAD_ONNX = "head.onnx"  # an image package's fold heads
OPSET = 18
BATCH = 64
CALIBRATION_SEED = 0

# the thresholds of the issue that asked for these runtimes; export refuses a runtime below them
MIN_COSINE = {ONNX: 0.999, INT8: 0.99, "bf16": 0.99}
MAX_PROB_DIFF = {INT8: 0.02, "bf16": 0.02}
SAME_LABELS = (INT8, "bf16")


class _Head(nn.Module):
    """The head (the CLAM ensemble, or an image package's fold heads) as a graph with plain
    outputs: bag -> (probabilities (C,), attention)."""

    def __init__(self, clam: nn.Module) -> None:
        super().__init__()
        self.clam = clam

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.clam(bag)
        return out["probs"][0], out["attention"]


@contextlib.contextmanager
def _restore_levels(loggers: list[logging.Logger], levels: list[int]) -> Iterator[None]:
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export(module: nn.Module, example: torch.Tensor, dest: Path, names: tuple, dim: str) -> None:
    """torch.onnx's dynamo export of `module` with a dynamic first axis `dim`, one file."""
    inputs, outputs = names
    chatter = io.StringIO()  # torch.onnx prints its steps on stdout, its optimizer logs them
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    with (
        contextlib.redirect_stdout(chatter),
        torch.inference_mode(False),
        torch.no_grad(),
        _restore_levels(quiet, levels),
    ):
        torch.onnx.export(
            module.eval(),
            (example,),
            str(dest),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=({0: torch.export.Dim(dim, min=1)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    log.debug("torch.onnx: %s", chatter.getvalue())


def export_graphs(pkg: Package, dest: Path, head_file: str = HEAD_ONNX) -> None:
    """`student.onnx` and the head graph `head_file` of the loaded package `pkg` into `dest`."""
    size = pkg.patch_size
    pkg.encoder.to("cpu", memory_format=torch.contiguous_format)
    patches = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    _export(
        pkg.encoder, patches, dest / STUDENT_ONNX, ((ENCODER_INPUT,), (ENCODER_OUTPUT,)), "batch"
    )
    bag = torch.randn(3, pkg.feature_dim)
    _export(_Head(pkg.clam), bag, dest / head_file, ((HEAD_INPUT,), HEAD_OUTPUTS), "n")


@dataclass
class SlideSample:
    """One bag the parity is measured on: a slide's patches, or one image (n = 1)."""

    slide_id: str
    patches: np.ndarray  # uint8 (n, S, S, 3)


@dataclass(frozen=True)
class ParitySource:
    """The pixels a package's runtimes are calibrated and checked on: `samples()` the evaluation
    bags (each slide's patches, or each evaluation image as a bag of one), `calibration()` the
    INT8 calibration pixels (N, S, S, 3); `unit` what a sample is (`slides`, `images`), `pixels`
    where the pixels came from, `max_per_sample` the cap on a sample's patches; `head_file` the
    head graph's file name."""

    samples: Callable[[], Iterator[SlideSample]]
    calibration: Callable[[], np.ndarray]
    unit: str
    pixels: str
    max_per_sample: int
    drawn_from: str = "the training slides, evenly per slide"  # the calibration pixels
    head_file: str = HEAD_ONNX


def _read(
    manifest: Manifest,
    by_id: dict[str, SlideEntry],
    patches_dir: Path,
    slide_id: str,
    pick,
    cache: SlideCache | None,
    store_dir: Path | None = None,
) -> np.ndarray:
    entry = by_id.get(slide_id)
    if entry is None:
        raise PackageError(f"evaluation slide {slide_id} is not in the manifest {manifest.path}")
    coords = read_coords(patches_dir / "patches" / f"{slide_id}.h5")
    idx = pick(len(coords.coords))
    sp = open_patches(slide_id, entry.uri, coords, manifest.base_dir, cache, store_dir)
    try:
        return np.concatenate(
            [sp.read_batch(idx[i : i + BATCH]) for i in range(0, len(idx), BATCH)]
        )
    finally:
        sp.close()


def evaluation_slides(
    manifest: Manifest,
    patches_dir: Path,
    slide_ids: list[str],
    max_patches: int,
    cache: SlideCache | None = None,
    store_dir: Path | None = None,
) -> Iterator[SlideSample]:
    """Each evaluation slide's patches, up to `max_patches` evenly spaced over its grid (from
    the patch-shard store `store_dir` when given, else from the slides)."""

    def pick(n: int) -> np.ndarray:
        return np.unique(np.linspace(0, n - 1, min(n, max_patches)).round().astype(np.int64))

    by_id = {s.slide_id: s for s in manifest.slides}
    for sid in slide_ids:
        yield SlideSample(sid, _read(manifest, by_id, patches_dir, sid, pick, cache, store_dir))


def calibration_patches(
    manifest: Manifest,
    patches_dir: Path,
    slide_ids: list[str],
    n: int,
    cache: SlideCache | None = None,
    store_dir: Path | None = None,
) -> np.ndarray:
    """`n` patches drawn at random (a fixed seed) from the training slides, evenly per slide
    (from the patch-shard store `store_dir` when given, else from the slides)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    per_slide = max(1, math.ceil(n / max(1, len(slide_ids))))

    def pick(k: int) -> np.ndarray:
        return np.sort(rng.choice(k, size=min(k, per_slide), replace=False))

    by_id = {s.slide_id: s for s in manifest.slides}
    got = [_read(manifest, by_id, patches_dir, sid, pick, cache, store_dir) for sid in slide_ids]
    return np.concatenate(got)[:n]


def quantize_int8(
    fp32: Path,
    dest: Path,
    calibration: np.ndarray,
    *,
    head: str = HEAD_ONNX,
    drawn_from: str = "the training slides, evenly per slide",
) -> dict[str, Any]:
    """`dest`: the static INT8 quantization of the student graph `fp32` (see the module
    docstring); returns how it was made, for model.json."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {ENCODER_INPUT: calibration[i : i + BATCH]}
                    for i in range(0, len(calibration), BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="efcm-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dest),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return {
        "tool": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel, 7-bit range (reduce_range)",
        "activations": "uint8, asymmetric, per tensor, MinMax calibration",
        "why_7_bit": "u8 x s8 products cannot saturate on x86 CPUs without VNNI (AVX2, AVX-512 "
        "without VNNI); CPUs with VNNI run them at the same speed",
        "head": f"FP32 ({head})",
        "calibration": {
            "patches": len(calibration),
            "from": f"{drawn_from}, drawn with a fixed seed",
            "seed": CALIBRATION_SEED,
        },
        "export_cpu_has_vnni": has_vnni(),
    }


@dataclass
class _Tally:
    """One runtime's parity figures against torch FP32, accumulated sample by sample; `label`
    is the package's call of class probabilities (`PackageFacts.label_of`)."""

    label: Callable[[np.ndarray], Any]
    distance: Callable[[np.ndarray], float]  # PackageFacts.boundary_distance
    tolerance: float  # the runtime's allowed probability difference (0: none allowed)
    cosines: list[np.ndarray] = field(default_factory=list)
    prob_diffs: list[float] = field(default_factory=list)
    same_label: int = 0
    decided: int = 0  # samples further than `tolerance` from their call's boundary
    same_decided: int = 0
    slides: int = 0  # samples: slides, or images

    def add(
        self, feats: np.ndarray, ref: np.ndarray, probs: np.ndarray, ref_probs: np.ndarray
    ) -> None:
        self.cosines.append(cosine_rows(feats, ref))
        self.prob_diffs.append(float(np.abs(probs - ref_probs).max()))
        same = int(self.label(probs) == self.label(ref_probs))
        self.same_label += same
        if self.distance(ref_probs) > self.tolerance:
            self.decided += 1
            self.same_decided += same
        self.slides += 1

    def figures(self, max_patches: int, unit: str = "slides") -> dict[str, Any]:
        cos = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        per = {"slides": {"max_patches_per_slide": max_patches}}.get(unit, {})
        return {
            "against": "torch FP32 on the CPU (the evaluated model)",
            "unit": unit,
            unit: self.slides,
            "patches": len(cos),
            **per,
            "feature_cosine_min": round(float(cos.min()), 6) if len(cos) else None,
            "feature_cosine_mean": round(float(cos.mean()), 6) if len(cos) else None,
            "max_prob_diff": round(max(self.prob_diffs), 6) if self.prob_diffs else None,
            "same_label": f"{self.same_label}/{self.slides}",
            "same_label_decided": f"{self.same_decided}/{self.decided}",
            "near_boundary": self.slides - self.decided,
            "boundary_tolerance": self.tolerance,
        }


def misses(name: str, fig: dict[str, Any]) -> list[str]:
    """What of runtime `name`'s parity figures `fig` misses its thresholds (empty: it passes)."""
    out = []
    if fig["feature_cosine_min"] is None:
        return ["no evaluation patches to measure it on"]
    if fig["feature_cosine_min"] < MIN_COSINE[name]:
        out.append(f"feature cosine min {fig['feature_cosine_min']} < {MIN_COSINE[name]}")
    if name in MAX_PROB_DIFF and fig["max_prob_diff"] > MAX_PROB_DIFF[name]:
        out.append(f"max probability difference {fig['max_prob_diff']} > {MAX_PROB_DIFF[name]}")
    unit = fig.get("unit", "slides")
    same, decided = fig["same_label_decided"].split("/")
    if name in SAME_LABELS and same != decided:
        out.append(
            f"the same label on {fig['same_label_decided']} {unit} further than "
            f"{fig['boundary_tolerance']} from their call's boundary, not all"
        )
    return out


def measure_parity(
    pkg: Package,
    runtimes: dict[str, OnnxRuntime],
    slides: Iterator[SlideSample],
    max_patches: int,
    *,
    bf16: bool,
    unit: str = "slides",
) -> dict[str, dict[str, Any]]:
    """Parity figures of each ONNX runtime (and of CPU bf16 autocast with `bf16`) against torch
    FP32 on the CPU, over `slides` (the samples, of `unit`)."""

    def tally(name: str) -> _Tally:
        return _Tally(pkg.label_of, pkg.boundary_distance, MAX_PROB_DIFF.get(name, 0.0))

    tallies = {name: tally(name) for name in runtimes}
    if bf16:
        tallies["bf16"] = tally("bf16")
    pkg.encoder.to("cpu", memory_format=torch.channels_last)

    def head(feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pkg.clam(torch.from_numpy(feats))["probs"][0].numpy()

    def torch_feats(x: np.ndarray, cpu_bf16: bool) -> np.ndarray:
        chunks = (torch.from_numpy(x[i : i + BATCH]) for i in range(0, len(x), BATCH))
        return embed_batches(pkg.encoder, chunks, total=len(x), desc="parity", cpu_bf16=cpu_bf16)

    for s in slides:
        ref = torch_feats(s.patches, False)
        ref_probs = head(ref)
        for name, rt in runtimes.items():
            feats = rt.embed(s.patches[i : i + BATCH] for i in range(0, len(s.patches), BATCH))
            tallies[name].add(feats, ref, rt.head(feats)[0], ref_probs)
        if bf16:
            feats = torch_feats(s.patches, True)
            tallies["bf16"].add(feats, ref, head(feats), ref_probs)
    return {name: t.figures(max_patches, unit) for name, t in tallies.items()}


def slide_source(
    manifest: Manifest,
    patches_dir: Path,
    slide_ids: list[str],
    *,
    calibration: int,
    max_patches: int,
    cache: SlideCache | None = None,
    store_dir: Path | None = None,
) -> ParitySource:
    """The evaluation slides `slide_ids` as a `ParitySource` (their pixels read from the
    patch-shard store `store_dir` when given, else from the slides)."""
    pixels = "read from the slides"
    if store_dir is not None:
        pixels = f"the patch-shard store ({json.dumps(read_store_meta(store_dir)['codec'])})"
    return ParitySource(
        samples=lambda: evaluation_slides(
            manifest, patches_dir, slide_ids, max_patches, cache, store_dir
        ),
        calibration=lambda: calibration_patches(
            manifest, patches_dir, slide_ids, calibration, cache, store_dir
        ),
        unit="slides",
        pixels=pixels,
        max_per_sample=max_patches,
    )


def write_runtimes(
    pkg: Package, dest: Path, wanted: list[str], source: ParitySource | None
) -> tuple[dict[str, Any], list[str]]:
    """Write the `wanted` ONNX runtimes (onnx, int8) of the loaded package `pkg` into its
    directory `dest`, calibrated and checked for parity on `source` (`slide_source`, or an image
    package's evaluation images); returns model.json's `runtimes` section and the files written.

    Raises:
        PackageError: a runtime misses its parity thresholds (the message has the figures).
    """
    ens = pkg.meta["ensemble"]
    section: dict[str, Any] = {
        TORCH: {
            "files": sorted(ens["students"] + ens.get("clams", ens.get("heads", []))),
            "device": "cuda when there is one (autocast), else the CPU",
        }
    }
    if not wanted:
        return section, []
    if source is None:
        raise PackageError(f"export.runtimes {wanted}: no evaluation pixels to check them on")
    head = source.head_file
    export_graphs(pkg, dest, head)
    files = [STUDENT_ONNX, head]
    loaded: dict[str, OnnxRuntime] = {}
    if ONNX in wanted:
        loaded[ONNX] = OnnxRuntime(
            dest, pkg.meta, ONNX, dest / STUDENT_ONNX, dest / head, threads=None
        )
    quantization = None
    if INT8 in wanted:
        calib = source.calibration()
        quantization = quantize_int8(
            dest / STUDENT_ONNX, dest / STUDENT_INT8, calib, head=head, drawn_from=source.drawn_from
        )
        files.append(STUDENT_INT8)
        loaded[INT8] = OnnxRuntime(
            dest, pkg.meta, INT8, dest / STUDENT_INT8, dest / head, threads=None
        )
    bf16 = cpu_bf16_native()
    parity = measure_parity(
        pkg, loaded, source.samples(), source.max_per_sample, bf16=bf16, unit=source.unit
    )
    for figures in parity.values():
        figures["pixels"] = source.pixels  # what the parity pixels were
    refused = {name: misses(name, parity[name]) for name in loaded}
    refused = {k: v for k, v in refused.items() if v}
    if refused:
        why = "; ".join(f"{k}: {', '.join(v)} (figures {parity[k]})" for k, v in refused.items())
        raise PackageError(
            f"export refuses runtime(s) {sorted(refused)} that miss parity with the evaluated "
            f"torch model: {why}. Leave them out of export.runtimes to ship the package without "
            "them."
        )
    for name, rt in loaded.items():
        section[name] = {
            "encoder": rt.files[0],
            "head": rt.files[1],
            "files": list(rt.files),
            "opset": OPSET,
            "parity": parity[name],
        }
    if quantization is not None:
        section[INT8]["quantization"] = quantization
    if bf16:
        section[TORCH]["bf16"] = {
            "parity": parity["bf16"],
            "passed": not misses("bf16", parity["bf16"]),
            "use": "the torch runtime's student on CPUs with native bf16, where this passed",
        }
    else:
        section[TORCH]["bf16"] = {"passed": False, "why": "the export CPU has no native bf16"}
    for name, fig in parity.items():
        log.info("parity of %s against torch FP32: %s", name, fig)
    return section, files
