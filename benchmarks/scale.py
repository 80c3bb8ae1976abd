"""ImageNet-shaped scale benchmark: each heavy stage's own code path at real model sizes, against the hardware.

    .venv/bin/python -m benchmarks.scale [--profile profiles/imagenet.yaml] [--images 256] [--device auto]
        [--precision auto] [--stages ...]

A temporary project holds N images in class order (ImageNet's lists come sorted by class; every
10th row test, the next val): with the `prepare` stage, generated JPEGs (--jpeg-size) decoded and
resized by the prepare stage itself, else random uint8 images written with ShardedWriter; a
manifest over ImageNet class ids, and random-init real architectures (torchvision ResNet-50 through
lib.models.backbones, open_clip ViT-B-16 through lib.models.clip; random weights cost the FLOPs of
trained ones). `--profile` takes the stored size (the profile's 256: the ResNet centre-crops 224),
models, grid, batches, M and the cbl/sparse lengths from a params profile. Each stage then runs
through its own entry point with a Params built here: `prepare`, `features`, `clip_images`,
`concepts` (--concept-texts prompts through the text tower) and `circles` (lib.pipeline), the `cbl`
training steps (lib.methods.salf: the stage's streams over the stores, P computed on the fly from
circles and M random concept embeddings), `sparse` (SAGA epochs on a streamed, class-ordered c*
store, K = --sparse-classes, LF-CBM's step), and FaCT's `sae_data` and CE-FAM's `regions`
per-image stages (after their trainers, `sae` and `translator`, ran a few steps untimed).

Per stage: items/s in the stage's steady-state loop (images; prompts for concepts; rows x epochs for
sparse), FLOPs per item (torch.utils.flop_counter on a probe, the MHA fast path switched off so
attention counts), achieved FLOP/s and, on a GPU, MFU against the dense peak of its precision
(table below; --peak-tflops for other hardware), the ratio to the bare model on batches already on
the device (`vs_bare`), the share of the loop spent waiting for input (reads from the stores), the
peak host RSS while the stage ran, the peak GPU memory, and the projected hours on ImageNet train +
val (`imagenet_items`). `circles` also runs the reference style (per variant: a Pillow ring,
preprocess, one forward; benchmarks/circles.py) for `circles_vs_reference`. Then every store's
bytes per image and its projected size on ImageNet, and the totals. The last line is `name=value`
pairs, e.g. `features_imgs=… features_mfu=… circles_vs_bare=… store_images_bytes_per_image=…`;
values that do not apply here (MFU without a known peak, GPU memory on a CPU) are `nan`.
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.circles import autocast_context, reference_loop
from lib.core.device import autocast_dtype, native_bf16, precision_name, resolve_device, set_reader_threads
from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import TEXT_EMB, clip_provenance
from lib.core.stores import ArraySpec, ShardedWriter
from lib.data.manifest import write_dataset_info, write_manifest
from lib.kernels.rings import CircleEncoder
from lib.models.backbones import load_backbone
from lib.models.classes import imagenet_classes
from lib.models.clip import load_clip
from lib.models.layers import forward_with_layers
from lib.toy.models.clip import register_toy_clip_config

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000  # ILSVRC-2012 train and val images
IMAGENET_IMAGES = IMAGENET_TRAIN + IMAGENET_VAL  # every per-image stage runs over both
LF_CBM_IMAGENET_CONCEPTS = 4751  # lines of LF-CBM's data/concept_sets/imagenet_filtered.txt
# Dense tensor-core peaks (TFLOP/s) by GPU name, the first match wins: (bf16/fp16, tf32). fp32 runs are
# held against the TF32 peak (cuDNN convolutions use TF32 by default in PyTorch).
GPU_PEAKS = (
    ("H200", 989.0, 494.0), ("H100 PCIe", 756.0, 378.0), ("H100", 989.0, 494.0), ("H800", 989.0, 494.0),
    ("A100", 312.0, 156.0), ("A800", 312.0, 156.0), ("L40S", 362.0, 183.0), ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0), ("A10", 125.0, 62.5), ("RTX 4090", 165.0, 82.6), ("V100", 125.0, 15.7),
)
STAGES = ("prepare", "features", "clip_images", "concepts", "circles", "cbl", "sparse", "sae_data", "regions")


def gpu_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """The device's dense peak FLOP/s at `dtype` (None: fp32 via TF32), or nan when unknown."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    for key, low, tf32 in GPU_PEAKS:
        if key in name:
            return 1e12 * (low if dtype is not None else tf32)
    return math.nan


@dataclass
class Result:
    """One stage's measurements (see the module doc); seconds cover `images` images of its loop."""

    images: int
    seconds: float
    flops_per_image: float
    bare_rate: float  # images/s of the bare model
    input_wait: float  # seconds waiting for reads
    rss_mib: float = math.nan
    gpu_mib: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def values(self, peak: float, imagenet_items: float) -> dict[str, float]:
        """The printed figures; `hours_imagenet`: `imagenet_items` (what the stage processes on
        ImageNet train + val in the units of `images`, see imagenet_items) at this rate."""
        flops = self.rate * self.flops_per_image
        return {
            "imgs": self.rate, "tflops": flops / 1e12, "mfu": flops / peak, "vs_bare": self.rate / self.bare_rate,
            "wait": self.input_wait / self.seconds, "rss_mib": self.rss_mib, "gpu_mib": self.gpu_mib,
            "hours_imagenet": imagenet_items / self.rate / 3600, **self.extra,
        }


def imagenet_items(stage: str, config: Params, args: argparse.Namespace) -> float:
    """What `stage` processes on ImageNet, in the units its Result counts: images for the per-image
    stages (train + val; regions explains evaluate.max_images of the test split), training images
    seen for cbl (max_steps x batch: early stopping can only shorten it), rows x epochs for sparse
    (the train split's c*), concept prompts for concepts (the text tower; the top-5 filter's image
    pass is one (N, D) x (D, M) product)."""
    if stage == "cbl":
        return args.cbl_max_steps * config.cbl.batch_size
    if stage == "sparse":
        return args.sparse_max_epochs * IMAGENET_TRAIN
    if stage == "concepts":
        return args.concepts
    if stage == "sae_data":
        return IMAGENET_TRAIN
    if stage == "regions":  # the test split: ILSVRC val
        return IMAGENET_VAL
    return IMAGENET_IMAGES


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak host RSS (MiB, sampled every 10 ms with psutil; else the process's ru_maxrss so far) and
    peak GPU memory allocated (MiB) while the block runs; filled in when it ends."""
    out: dict[str, float] = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    done = threading.Event()
    peak = [0]
    if psutil is not None:
        process = psutil.Process()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        yield out
    finally:
        done.set()
        if psutil is not None:
            sampler.join()
            out["rss_mib"] = max(peak[0], process.memory_info().rss) / 2**20
        else:
            out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def count_flops(fn: Callable[[], object], *modules: torch.nn.Module) -> float:
    """FLOPs of one call of `fn`, counted by torch.utils.flop_counter.

    Grad is on and the modules' parameters require it while counting, so nn.MultiheadAttention
    leaves its inference fast path (one fused op the counter does not see) for the ops it counts.
    """
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(True)
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for module, saved in zip(modules, flags):
            for p, flag in zip(module.parameters(), saved):
                p.requires_grad_(flag)
    return float(counter.get_total_flops())


def best_rate(fn: Callable[[], object], images_per_call: int, device: torch.device, calls: int) -> float:
    """images/s of `fn` over `calls` timed calls after one warm-up."""
    fn()
    sync(device)
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return images_per_call * calls / (time.perf_counter() - began)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the synthetic project
def make_project(root: Path, args: argparse.Namespace) -> tuple[Params, Layout]:
    """Write images.zarr (random uint8 images), the manifest and the dataset info; return the params
    every stage runs with and the layout."""
    autocast = {"auto": "auto", "bf16": True, "fp32": False}[args.precision]
    n, size, rows = args.images, args.size, args.rows_per_shard
    config = Params.model_validate({
        "runtime": {"device": args.device, "num_workers": args.workers},
        "data": {"name": "scale", "image_size": size, "rows_per_shard": rows},
        "backbone": {"arch": args.backbone, "weights": args.backbone_weights},
        "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained},
        "features": {"layers": list(args.layers), "batch_size": args.features_batch, "autocast": autocast},
        "clip_images": {"batch_size": args.clip_batch, "autocast": autocast},
        "circles": {"grid": args.grid, "radius": args.radius, "width": args.width, "batch_size": args.circles_batch,
                    "chunk": args.chunk, "autocast": autocast},
        "similarity": {"materialize": False},
        "cbl": {"batch_size": args.cbl_batch, "max_steps": args.cbl_steps, "eval_every": args.cbl_steps, "in_memory_mb": 0},
        "sparse": {"batch_size": args.sparse_batch},
        "fact": {"batch_size": args.fact_batch, "sae": {"expansion": args.sae_expansion, "k": 32, "aux_k": 64, "epochs": args.sae_epochs,
                                                         "warmup_epochs": 0, "decay_epochs": 0, "batch_size": args.sae_batch}},
        "cefam": {"translator": {"max_epochs": 1, "batch_size": 64},
                  "regions": {"batch_size": args.regions_batch, "contribution_concepts": 1, "n_figures": 0}},
        "evaluate": {"max_images": args.regions_images},
    })
    layout = Layout(root / "data" / "scale", root / "metrics")
    layout.root.mkdir(parents=True)
    layout.metrics.mkdir(parents=True)
    classes, labels, split = class_ordered(n, args.classes)
    if "prepare" in args.stages:  # the images come from JPEGs through the prepare stage (bench_prepare)
        return config, layout
    fingerprint = params_hash({"synthetic": [n, size, rows, args.seed]})
    writer = ShardedWriter(
        layout.images,
        [ArraySpec("images", (n, size, size, 3), "uint8", ("item", "y", "x", "rgb")), ArraySpec("labels", (n,), "int64", ("item",))],
        rows, {"stage": "benchmark", "dataset": "synthetic"}, fingerprint,
    )
    for shard in writer.pending():
        span = writer.rows(shard)
        rng = np.random.default_rng([args.seed, shard])
        writer.write(shard, {"images": rng.integers(0, 256, (span.stop - span.start, size, size, 3), dtype=np.uint8),
                             "labels": labels[span]})
    writer.finalize()
    write_manifest(layout.manifest, pd.DataFrame({"index": np.arange(n), "source": [f"synthetic:{i}" for i in range(n)],
                                                  "label": labels, "split": split}))
    write_dataset_info(layout.dataset_info, {"kind": "imagefolder", "classes": classes, "concepts": [], "rules": []})
    return config, layout


def class_ordered(n: int, n_classes: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(WordNet ids of the classes, labels, splits) of n rows in class order, as ImageNet's lists
    come: rows sorted by class; within a class every 10th row test and the next val. At most n // 3
    classes, so every class has train rows and every split some. WordNet ids map the classes onto
    a 1000-output backbone by name."""
    classes = list(imagenet_classes().ids[: max(1, min(n_classes, n // 3))])
    labels = np.arange(n) * len(classes) // n
    within = np.arange(n) - np.searchsorted(labels, labels)  # position inside the class's block
    split = np.select([within % 10 == 0, within % 10 == 1], ["test", "val"], "train")
    return classes, labels, split


def write_jpegs(folder: Path, n: int, args: argparse.Namespace) -> tuple[Path, float]:
    """n JPEGs (quality 90) of args.jpeg_size, smooth random colour fields plus grain (natural-photo-like
    file sizes), under folder/<wnid>/, and a class-ordered list file (path, label, split); returns
    (the list file, mean JPEG KiB)."""
    from PIL import Image

    classes, labels, split = class_ordered(n, args.classes)
    width, height = args.jpeg_size
    rng = np.random.default_rng(args.seed)
    paths, total = [], 0
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / classes[labels[i]] / f"{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
        total += path.stat().st_size
    list_file = folder / "list.csv"
    pd.DataFrame({"path": paths, "label": [classes[k] for k in labels], "split": split}).to_csv(list_file, index=False)
    return list_file, total / n / 1024


def write_concepts(layout: Layout, model_id: str, dim: int, m: int, seed: int) -> None:
    """A concepts store of `m` random unit text embeddings, recorded as made by the CLIP `model_id`
    (encoding thousands of prompts with a random text tower measures nothing here)."""
    emb = torch.nn.functional.normalize(torch.randn(m, dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    fingerprint = params_hash({"synthetic concepts": [m, dim, seed, model_id]})
    records = [{"name": f"concept {j}", "type": None, "prompt": f"concept {j}"} for j in range(m)]
    writer = ShardedWriter(layout.concepts, [ArraySpec(TEXT_EMB, (m, dim), "float16", ("concept", "embed"))], m,
                           {"stage": "concepts", **clip_provenance(model_id, dim), "concepts": records, "dropped": []}, fingerprint)
    writer.write(0, {TEXT_EMB: emb.numpy()})
    writer.finalize()


# ---------------------------------------------------------------------------------------------
# the stages
def extraction_stage(run: Callable, config: Params, layout: Layout, device: torch.device) -> tuple[object, dict[str, float]]:
    """Run an extraction stage's entry point; its report and the peak memory while it ran."""
    with peak_memory(device) as memory:
        report = run(config, layout, device, Ranks(), None)
    return report, memory


def bench_features(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    from lib.pipeline.features import run_features

    report, memory = extraction_stage(run_features, config, layout, device)
    torch.manual_seed(0)  # the stage's random init
    backbone = load_backbone(config.backbone.arch, config.backbone.weights)
    model = backbone.model.to(device).eval()
    dtype = autocast_dtype(device, config.features.autocast)
    x = backbone.preprocess(torch.randint(0, 256, (config.features.batch_size, args.size, args.size, 3), dtype=torch.uint8, device=device))

    @torch.inference_mode()
    def bare() -> None:
        with autocast_context(device, dtype):
            model(x)

    flops = count_flops(lambda: forward_with_layers(model, x[:1], config.features.layers), model)
    fill = report.fill
    return Result(fill.images, fill.seconds, flops, best_rate(bare, len(x), device, args.bare_calls), fill.input_wait,
                  memory["rss_mib"], memory["gpu_mib"])


def clip_model(config: Params, device: torch.device):  # noqa: ANN201 (LoadedClip)
    clip = load_clip(config.clip.model, config.clip.pretrained)
    clip.model.to(device)
    return clip


def bench_clip_images(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    from lib.pipeline.clip_images import run_clip_images

    report, memory = extraction_stage(run_clip_images, config, layout, device)
    clip = clip_model(config, device)
    dtype = autocast_dtype(device, config.clip_images.autocast)
    x = torch.randn(config.clip_images.batch_size, 3, clip.preprocess.size, clip.preprocess.size, device=device)

    @torch.inference_mode()
    def bare() -> None:
        with autocast_context(device, dtype):
            clip.model.encode_image(x)

    flops = count_flops(lambda: clip.model.encode_image(x[:1]), clip.model)
    fill = report.fill
    return Result(fill.images, fill.seconds, flops, best_rate(bare, len(x), device, args.bare_calls), fill.input_wait,
                  memory["rss_mib"], memory["gpu_mib"])


def bench_circles(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    from lib.pipeline.circles import run_circles

    report, memory = extraction_stage(run_circles, config, layout, device)
    settings = config.circles
    clip = clip_model(config, device)
    encoder = CircleEncoder(clip.model, clip.preprocess, settings.grid, settings.radius, settings.width, settings.color,
                            settings.chunk, settings.autocast)
    variants, size = settings.grid**2, clip.preprocess.size
    per_forward = min(settings.batch_size, encoder.images_per_forward)  # source images in one forward of the stage
    x = torch.randn(per_forward * variants, 3, size, size, device=device)

    @torch.inference_mode()
    def bare() -> None:
        with autocast_context(device, encoder.dtype):
            clip.model.encode_image(x)

    images = torch.randint(0, 256, (args.reference_images, size, size, 3), dtype=torch.uint8)
    reference = best_rate(
        lambda: reference_loop(clip.model, clip.preprocess, images, settings.grid, settings.radius, settings.width, device, encoder.dtype),
        len(images), device, 1,
    )
    flops = variants * count_flops(lambda: clip.model.encode_image(x[:1]), clip.model)
    fill = report.fill
    bare_rate = best_rate(bare, per_forward, device, args.bare_calls)  # source images/s
    return Result(fill.images, fill.seconds, flops, bare_rate, fill.input_wait, memory["rss_mib"], memory["gpu_mib"],
                  {"vs_reference": fill.images / fill.seconds / reference})


class TimedSource:
    """A batch source whose iterators add the seconds spent waiting for each batch to `wait`."""

    def __init__(self, source: Callable[[], Iterator]) -> None:
        self.source, self.wait = source, 0.0

    def __call__(self) -> Iterator:
        batches = self.source()
        while True:
            began = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - began
            yield batch


def bench_cbl(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """The cbl stage's training loop over its streamed inputs (run_cbl's own functions; the val
    evaluation at the last step is included), P on the fly from circles and the concepts."""
    from functools import partial

    from lib.core.stores import open_store
    from lib.kernels.registration import sample_features
    from lib.methods.salf.bottleneck_stage import cbl_layer
    from lib.methods.salf.cbl import cubic_cosine_loss, train_bottleneck
    from lib.methods.salf.data import pair_batches, registration_of, similarity_target, splits_of
    from lib.pipeline.similarity import run_similarity
    from lib.pipeline.stored_concepts import read_concepts

    run_similarity(config, layout, device, Ranks(), None)  # materialize: false, P is computed on the fly
    params = config.cbl
    splits, layer = splits_of(config, layout), cbl_layer(config)
    features = open_store(layout.features(layer))["features"]
    target = similarity_target(layout, read_concepts(layout.concepts))
    positions = registration_of(layout, layer).feature_grid(device)
    sampler = partial(sample_features, grid=positions)
    stream = dict(device=device, in_memory_mb=params.in_memory_mb)
    train = TimedSource(pair_batches(features, target, splits.train, params.batch_size, sampler, shuffle=True, **stream))
    val = pair_batches(features, target, splits.val, params.batch_size, sampler, **stream)
    with peak_memory(device) as memory:
        sync(device)
        began = time.perf_counter()
        model, _ = train_bottleneck(train, val, features.shape[1], target.n_concepts, positions, max_steps=params.max_steps,
                                    eval_every=params.eval_every, device=device)
        sync(device)
        seconds = time.perf_counter() - began
    batch = min(params.batch_size, len(splits.train))
    raw = {name: torch.from_numpy(a[:batch]).to(device) for name, a in (("features", features), ("target", target.array))}
    optimiser = torch.optim.Adam(model.parameters())

    def step() -> None:  # what one training step computes, on a batch already on the device
        model.train()
        loss = cubic_cosine_loss(model.project(sampler(raw["features"])), target(raw["target"]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    flops = count_flops(step) / batch
    return Result(params.max_steps * batch, seconds, flops, best_rate(step, batch, device, args.bare_calls), train.wait,
                  memory["rss_mib"], memory["gpu_mib"])


def timed_entry(run: Callable[[], object], count: Callable[[], object], images: int, device: torch.device) -> Result:
    """A per-image stage without a bare-model counterpart: its wall time, and its FLOPs counted over
    a second, identical run (`count` redoes the stage's work from scratch)."""
    with peak_memory(device) as memory:
        sync(device)
        began = time.perf_counter()
        run()
        sync(device)
        seconds = time.perf_counter() - began
    flops = count_flops(count) / images
    return Result(images, seconds, flops, math.nan, math.nan, memory["rss_mib"], memory["gpu_mib"])


def bench_sae_data(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """FaCT's sae_data: per train image, the tail's gradient at the layer and the sampled vectors."""
    import shutil

    from lib.data.manifest import read_manifest, train_val_indices
    from lib.methods.fact.vectors import run_sae_data

    train, _, _ = train_val_indices(read_manifest(layout.manifest), config.fact.val_fraction, config.fact.seed)

    def fresh() -> None:
        shutil.rmtree(layout.fact_vectors, ignore_errors=True)
        run_sae_data(config, layout, device, Ranks(), None)

    layout.fact.mkdir(parents=True, exist_ok=True)
    return timed_entry(fresh, fresh, len(train), device)


def bench_regions(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """CE-FAM's regions on the test split (evaluate.max_images of it), after a short untimed translator run."""
    import shutil

    from lib.data.manifest import read_manifest, split_indices
    from lib.methods.cefam.regions_stage import run_regions
    from lib.methods.cefam.translator_stage import run_translator

    run_translator(config, layout, device, Ranks(), None)
    rows = split_indices(read_manifest(layout.manifest), config.evaluate.split)[: config.evaluate.max_images]

    def fresh() -> None:
        for path in (layout.cefam_regions, layout.concept_stats("cefam")):
            shutil.rmtree(path, ignore_errors=True)
        run_regions(config, layout, device, Ranks(), None)

    return timed_entry(fresh, fresh, len(rows), device)


def bench_prepare(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """The prepare stage on generated JPEGs of a class-ordered list: decode, resize to data.image_size
    and store (runtime.num_workers decoding processes). Timed on --prepare-images of them in a scratch
    project (N is too few to amortise the workers' start), then run on the N the other stages read."""
    import shutil

    from rich.progress import Progress

    from lib.data.prepare import run_prepare

    def prepare(n: int, into: Layout) -> tuple[float, float, dict[str, float]]:
        into.root.mkdir(parents=True, exist_ok=True)
        list_file, jpeg_kib = write_jpegs(into.root.parent.parent / "jpegs", n, args)
        data = {**config.data.model_dump(), "kind": "imagefolder", "imagefolder": {"list_file": str(list_file)}}
        prepared = Params.model_validate({**config.model_dump(), "data": data})
        with peak_memory(device) as memory:
            began = time.perf_counter()
            run_prepare(prepared, into, device, Progress(disable=True))
            return time.perf_counter() - began, jpeg_kib, memory

    scratch = layout.root.parent.parent / "prepare_timing"
    seconds, jpeg_kib, memory = prepare(args.prepare_images, Layout(scratch / "data" / "scale", scratch / "metrics"))
    shutil.rmtree(scratch)
    prepare(args.images, layout)
    return Result(args.prepare_images, seconds, math.nan, math.nan, math.nan, memory["rss_mib"], memory["gpu_mib"],
                  {"jpeg_kib": jpeg_kib})


def bench_concepts(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """The concepts stage on args.concept_texts prompts (the text tower is linear in M; the projection
    scales to args.concepts), its filters set to keep everything: a random CLIP's cosines mean nothing.
    The store is then removed: cbl and regions read M random embeddings (write_concepts)."""
    import shutil

    from lib.pipeline.concepts import run_concepts

    concept_file = layout.root.parent.parent / "concepts.txt"
    concept_file.write_text("".join(f"concept number {j}\n" for j in range(args.concept_texts)))
    from lib.data.manifest import read_manifest, split_indices

    enough = len(split_indices(read_manifest(layout.manifest), "train")) >= 5  # the top-5 filter's minimum
    settings = {"file": str(concept_file), "duplicate_threshold": 1.0, "class_similarity_threshold": 1.0,
                "min_top5_similarity": -0.999 if enough else -1.0}  # > -1: the top-5 pass over the train images runs
    configured = Params.model_validate({**config.model_dump(), "concepts": {**config.concepts.model_dump(), **settings}})
    with peak_memory(device) as memory:
        began = time.perf_counter()
        run_concepts(configured, layout, device, None)
        seconds = time.perf_counter() - began
    shutil.rmtree(layout.concepts)
    return Result(args.concept_texts, seconds, math.nan, math.nan, math.nan, memory["rss_mib"], memory["gpu_mib"])


class EpochTimer:
    """A batch source that records each pass's seconds, from its call to its last batch consumed."""

    def __init__(self, source: Callable[[], Iterator]) -> None:
        self.source, self.passes = source, []

    def __call__(self) -> Iterator:
        began = time.perf_counter()
        yield from self.source()
        self.passes.append(time.perf_counter() - began)


def bench_sparse(config: Params, layout: Layout, device: torch.device, args: argparse.Namespace) -> Result:
    """SAGA epochs on a c* store streamed from disk (sparse.in_memory_mb exceeded): args.sparse_rows
    class-ordered rows of M = args.concepts random activations and K = args.sparse_classes classes,
    LF-CBM's step 0.1 and lambda; the epochs' seconds exclude the statistics pass. Items: rows x epochs."""
    from lib.core.streams import batch_source
    from lib.methods.salf.data import glm_batches
    from lib.methods.salf.glm import fit_elastic_net_path
    from lib.methods.salf.pooling import Standardiser

    n, m, k = args.sparse_rows, args.concepts, args.sparse_classes
    labels = np.arange(n) * k // n
    rng = np.random.default_rng(args.seed)
    writer = ShardedWriter(
        layout.salf_activations,
        [ArraySpec("activations", (n, m), "float32", ("item", "concept")), ArraySpec("labels", (n,), "int64", ("item",))],
        args.rows_per_shard, {"stage": "benchmark"}, params_hash({"synthetic c*": [n, m, k, args.seed]}),
    )
    for shard in writer.pending():
        span = writer.rows(shard)
        writer.write(shard, {"activations": rng.standard_normal((span.stop - span.start, m), dtype=np.float32),
                             "labels": labels[span]})
    writer.finalize()
    activations, stored_labels = writer.group["activations"], writer.group["labels"]
    rows = np.arange(n)
    standardiser = Standardiser.fit(b["activations"] for b in batch_source({"activations": activations}, rows, 4096)())
    train = EpochTimer(glm_batches(activations, stored_labels, rows, standardiser, config.sparse.batch_size, shuffle=True,
                                   device=device))
    val = (torch.zeros(k, m), torch.arange(k))
    with peak_memory(device) as memory:
        fit_elastic_net_path(train, val, n_classes=k, alpha=0.99, lambdas=[1e-4 / 0.99], step_size=0.1,
                             max_epochs=args.sparse_epochs, tol=1e-30, device=device)
    seconds = sum(train.passes[1:])  # pass 0 gathers the label counts and the table's start
    return Result(n * (len(train.passes) - 1), seconds, 4.0 * m * k, math.nan, math.nan, memory["rss_mib"],
                  memory["gpu_mib"], {"epoch_s_1m28": seconds / (len(train.passes) - 1) * IMAGENET_TRAIN / n})


UNITS = {"concepts": "prompt", "sparse": "row", "cbl": "img"}  # what a stage's rate counts (default: images)
BENCHES: dict[str, Callable[[Params, Layout, torch.device, argparse.Namespace], Result]] = {
    "prepare": bench_prepare, "features": bench_features, "clip_images": bench_clip_images, "concepts": bench_concepts,
    "circles": bench_circles, "cbl": bench_cbl, "sparse": bench_sparse, "sae_data": bench_sae_data, "regions": bench_regions,
}
# what each stage reads that an earlier stage writes (they run in STAGES order)
NEEDS = {"cbl": ("features", "circles"), "sae_data": ("features",), "regions": ("features", "clip_images"),
         "concepts": ("clip_images",)}


def store_sizes(root: Path) -> dict[str, tuple[int, int]]:
    """(bytes on disk, rows its chunks hold) of every Zarr store under `root` (the concepts store, per
    concept, has no suffix)."""
    sizes = {}
    for path in sorted(root.rglob("*.zarr")):
        if any(parent.suffix == ".zarr" for parent in path.parents):
            continue
        group = zarr.open_group(path, mode="r")
        first = next(iter(group.array_keys()), None)
        if first is None:
            continue
        name = str(path.relative_to(root).with_suffix("")).replace("/", "_")
        # rows the written chunks cover: a partial last chunk is stored whole, which at small N would
        # inflate the bytes per image (10 rows in a 100-row chunk: 10x); at ImageNet's N it vanishes
        rows, chunk = group[first].shape[0], group[first].chunks[0]
        sizes[name] = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), math.ceil(rows / chunk) * chunk)
    return sizes


def profile_defaults(path: str) -> dict[str, object]:
    """The benchmark's defaults a params profile sets (its data, models, grid, batches, cbl and sparse
    lengths); the models stay random-init (the weights' files are the profile's placeholders)."""
    from lib.core.profile import profile_params

    config = profile_params(path)
    return {
        "size": config.data.image_size, "rows_per_shard": config.data.rows_per_shard, "backbone": config.backbone.arch,
        "layers": list(config.features.layers), "clip_model": config.clip.model, "grid": config.circles.grid,
        "radius": config.circles.radius, "width": config.circles.width, "features_batch": config.features.batch_size,
        "clip_batch": config.clip_images.batch_size, "circles_batch": config.circles.batch_size, "chunk": config.circles.chunk,
        "cbl_batch": config.cbl.batch_size, "cbl_max_steps": config.cbl.max_steps, "sparse_max_epochs": config.sparse.max_epochs,
        "sparse_batch": config.sparse.batch_size, "concepts": LF_CBM_IMAGENET_CONCEPTS, "sparse_classes": 1000,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="take sizes, models, batches and lengths from this params profile "
                        "(e.g. profiles/imagenet.yaml: 256 px stored, 224 cropped, M = 4751); flags given too win")
    parser.add_argument("--images", type=int, default=256, help="N: synthetic images")
    parser.add_argument("--size", type=int, default=224, help="stored image side (the models' input)")
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100, help="ImageNet classes the images are labelled with")
    parser.add_argument("--backbone", default="torchvision:resnet50")
    parser.add_argument("--backbone-weights", default=None, help="backbone.weights (default: none, a seeded random init)")
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"], help="features.layers (the last: cbl's and FaCT's)")
    parser.add_argument("--clip-model", default="ViT-B-16")
    parser.add_argument("--clip-pretrained", default=None, help="clip.pretrained (default: none, a random init)")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--radius", type=float, default=32.0)
    parser.add_argument("--width", type=float, default=2.0)
    parser.add_argument("--concepts", type=int, default=4096, help="M: concepts of P (random text embeddings)")
    parser.add_argument("--features-batch", type=int, default=128)
    parser.add_argument("--clip-batch", type=int, default=128)
    parser.add_argument("--circles-batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512, help="circles.chunk: most CLIP inputs per forward")
    parser.add_argument("--cbl-batch", type=int, default=256)
    parser.add_argument("--cbl-steps", type=int, default=20)
    parser.add_argument("--fact-batch", type=int, default=64)
    parser.add_argument("--sae-expansion", type=float, default=8.0, help="fact.sae.expansion: latents per channel")
    parser.add_argument("--sae-batch", type=int, default=4096, help="fact.sae.batch_size")
    parser.add_argument("--sae-epochs", type=float, default=0.01, help="fact.sae.epochs (the SAE's training is not timed)")
    parser.add_argument("--regions-batch", type=int, default=8)
    parser.add_argument("--regions-images", type=int, default=16, help="images of the test split regions explains")
    parser.add_argument("--reference-images", type=int, default=1, help="images through circles' reference loop")
    parser.add_argument("--bare-calls", type=int, default=3, help="timed calls of each bare model")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="features/clip_images/circles autocast: auto = bf16 where the hardware runs it natively")
    parser.add_argument("--workers", type=int, default=2, help="runtime.num_workers: store reader threads")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU where the table has none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                        help="prepare: generated JPEGs' size (ImageNet's typical photo)")
    parser.add_argument("--prepare-images", type=int, default=256, help="prepare: JPEGs of the timed run")
    parser.add_argument("--concept-texts", type=int, default=64, help="concepts: prompts encoded (projected to --concepts)")
    parser.add_argument("--sparse-rows", type=int, default=4096, help="sparse: rows of the synthetic c* store")
    parser.add_argument("--sparse-classes", type=int, default=1000, help="sparse: K")
    parser.add_argument("--sparse-batch", type=int, default=256, help="sparse.batch_size")
    parser.add_argument("--sparse-epochs", type=int, default=2, help="sparse: SAGA epochs timed")
    parser.add_argument("--cbl-max-steps", type=int, default=1000, help="cbl.max_steps of the projection")
    parser.add_argument("--sparse-max-epochs", type=int, default=80, help="sparse.max_epochs of the projection")
    known, _ = parser.parse_known_args(argv)
    if known.profile is not None:
        parser.set_defaults(**profile_defaults(known.profile))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_reader_threads(args.workers)
    register_toy_clip_config()  # so --clip-model toy-clip (a small CLIP) works too
    stages = [s for s in STAGES if s in args.stages]
    missing = {need for s in stages for need in NEEDS.get(s, ()) if need not in stages}
    stages = [s for s in STAGES if s in stages or s in missing]
    dtype = autocast_dtype(device, {"auto": "auto", "bf16": True, "fp32": False}[args.precision])
    peak = 1e12 * args.peak_tflops if args.peak_tflops else gpu_peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={device} ({name}) precision={precision_name(dtype)} native_bf16={native_bf16(device)} images={args.images} "
          f"size={args.size} backbone={args.backbone} clip={args.clip_model} grid={args.grid} concepts={args.concepts} "
          f"workers={args.workers} peak={peak / 1e12:.0f} TFLOP/s", flush=True)
    values: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scale_") as folder:
        config, layout = make_project(Path(folder), args)
        for stage in stages:
            if stage in ("cbl", "regions") and not layout.concepts.exists():
                clip = load_clip(config.clip.model, config.clip.pretrained)
                write_concepts(layout, clip.model_id, clip.embed_dim, args.concepts, args.seed)
            result = BENCHES[stage](config, layout, device, args)
            for key, value in result.values(peak, imagenet_items(stage, config, args)).items():
                values[f"{stage}_{key}"] = value
            print(f"{stage:12s} {result.rate:9.2f} {UNITS.get(stage, 'img')}/s  "
                  f"{result.rate * result.flops_per_image / 1e12:8.3f} TFLOP/s ({result.flops_per_image / 1e9:.1f} GFLOP/item)  "
                  f"mfu {values[f'{stage}_mfu']:.3f}  vs bare {values[f'{stage}_vs_bare']:.3f}  input wait "
                  f"{values[f'{stage}_wait']:.1%}  rss {result.rss_mib:.0f} MiB  gpu {result.gpu_mib:.0f} MiB  ImageNet: "
                  f"{values[f'{stage}_hours_imagenet']:.2f} h" + "".join(f"  {key} {value:.3g}" for key, value in result.extra.items()),
                  flush=True)
        sizes = store_sizes(layout.root)
    print(f"stores (bytes per row; ImageNet train + val = {IMAGENET_IMAGES:,} images):")
    for name, (size, rows) in sizes.items():
        values[f"store_{name}_bytes_per_image"] = size / rows
        values[f"store_{name}_gb_imagenet"] = size / rows * IMAGENET_IMAGES / 1e9
        print(f"  {name:28s} {size / rows:12,.0f} B/image  {size / rows * IMAGENET_IMAGES / 1e9:9.1f} GB")
    hours = sum(values[f"{stage}_hours_imagenet"] for stage in stages)
    disk = sum(values[f"store_{name}_gb_imagenet"] for name in sizes)
    values.update(total_hours_imagenet=hours, total_gb_imagenet=disk)
    print(f"projected for ImageNet on this machine: {hours:.1f} h over the stages run, {disk:,.0f} GB of stores")
    print(" ".join(f"{key}={value:.4g}" for key, value in values.items()))
    return values


if __name__ == "__main__":
    main()
