"""NVIDIA DALI input pipelines for the JPEG datasets (imagenet, tiny_imagenet): `data.loader=dali`.

    loader = build(cfg.data, dist, "train", seed=cfg.run.seed, channels_last=cfg.model.channels_last)
    loader.sampler.set_epoch(epoch, start_batch)
    for images, labels in loader: ...         # like imnet.data.DeviceLoader

Imported only when data.loader == "dali"; DALI itself (`pip install -e ".[dali]"`) is imported only
when a pipeline is built, so `info_only` loaders and `dali_info` work without it.

Where it runs: with a CUDA `dist.device` JPEGs are decoded by the "mixed" decoder (nvJPEG, with
`data.dali_hw_decoder_load` of them on the A100/H100 hardware decoder) and every later op runs on
that GPU; on a CPU device the whole pipeline runs on CPU threads (`device_id=None`), which is what
the tests exercise. Output: float32 always (as the torch loader; autocast casts at the first layer),
NCHW, or channels-last memory format of the same NCHW-shaped tensor when `model.channels_last`.

Files and labels: the same files in the same order with the same labels as the torch loader (the
imagenet list comes from torchvision's ImageFolder via `build_dataset`, labels = sorted class folder
index; tiny_imagenet from `datasets.tiny_imagenet_files`, labels = wnids.txt line). The reader gets
an explicit `files` list and, as its "label", each file's index in that list; the class label is
looked up in Python, so every batch also tells which files it holds (`loader.last_indices`).

Train epoch (rank r of world w, batch b, n images): the same permutation and the same shard as the
torch loader's `TrainSampler` (a full shuffle drawn from (run.seed, epoch); n // (w * b) batches on
every rank; rank r takes every w-th image of the first n // (w * b) * w * b; the dropped tail changes
every epoch). Each epoch builds a fresh pipeline whose reader reads exactly this rank's list in
order (not DALI's `random_shuffle` + `shard_id`: that draws from a prefetch buffer of `initial_fill`
samples, and the stream it makes has no epoch boundary, so an image can repeat before the shard is
done) and whose random ops are seeded from (run.seed, epoch, rank). DALI's random ops draw per
sample slot of the batch, so the augmentation of a batch is a function of that seed and the batch's
position in the epoch, independent of `num_threads`.

Resume: `sampler.set_epoch(epoch, start_batch=k)` rebuilds epoch `epoch` from its seed and runs
its first k batches through the pipeline without yielding them (the decoding cost of k batches), so
the batches after k are bit-identical to an uninterrupted epoch: same files, same crops, same flips
(pixels included on the CPU pipeline; with the GPU decoder the files, crop windows and flips are the
same by the same construction). DALI's own checkpointing
(`enable_checkpointing`) is not used: it needs the serialized pipeline state stored in the training
checkpoint, which keeps only (epoch, batch). Iterating the loader again without `set_epoch` starts
the next epoch.

Validation: rank r takes files r, r + w, ... of the sorted list (no shuffle, no padding duplicates:
the reader pads its last batch and the iterator's LastBatchPolicy.PARTIAL cuts it off), so the
ranks together yield every image exactly once; the last batch may be short.

Recipes (S = data.image_size, default 224 for imagenet, 64 for tiny_imagenet; mean/std are the
ImageNet ones x 255 because DALI works on 0..255 pixels):
  imagenet train  decoders.image_random_crop(area 0.08-1, aspect 3/4-4/3, 10 attempts) ->
                  resize to S x S (linear, antialias) -> coin_flip(0.5) mirror (data.hflip) -> normalize
  imagenet val    decode -> resize so the short side is R = round(S * 256 / 224) and the long side
                  int(R * long / short) (torchvision's Resize(R) sizes, computed from the JPEG header)
                  with linear + antialias -> S x S crop at torchvision's CenterCrop offset
                  (round((size - S) / 2), half to even) -> normalize
  tiny train      decode -> resize to S x S (a no-op at 64) -> S x S crop at a random offset in
                  [-p, p] px with zero fill (p = data.crop_pad or tf.crop_pad(S), 8 px at 64) -> coin_flip
                  mirror (data.hflip) ->
                  normalize: the torch loader's CIFAR-style recipe for tiny_imagenet, not a
                  random-resized-crop, so both loaders train on the same distribution
  tiny val        decode -> resize to S x S (a no-op at 64) -> normalize
  data.augment=false trains with the val recipe. EXIF orientation is ignored (adjust_orientation=
  False) as PIL's ImageFolder loader ignores it; the GPU decoder uses libjpeg-turbo's "fancy" chroma
  upsampling (jpeg_fancy_upsampling=True) as PIL does.

Parity with the torch loader (val recipe, CPU decoder, the same JPEGs): every pixel within one
0..255 level (the two resamplers round differently); DALI's usual `resize_shorter` +
`crop_mirror_normalize(crop_pos 0.5)` is much further off, as its long-side rounding and centre
offset differ from torchvision's by a pixel. The numbers per option are in
tests/test_dali.py::test_val_parity_with_the_torch_loader.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch

from imnet.data import transforms as tf
from imnet.data.core import DataError, DatasetInfo, derive_seed
from imnet.data.datasets import IMAGENET_HELP, build_dataset, tiny_imagenet_files
from imnet.data.samplers import TrainSampler

NAMES = ("imagenet", "tiny_imagenet")
_NATIVE = {"imagenet": 224, "tiny_imagenet": 64}  # default S (px) when data.image_size is unset
_DEFAULT_THREADS = 4       # DALI CPU threads per rank when data.workers is 0
_PREFETCH = 2              # batches DALI prepares ahead
_READER = "Reader"         # the reader's name, for the iterator's reader_name
_SEED_MASK = 0x7FFF_FFFF   # DALI seeds are non-negative ints


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"data.loader=dali supports data.name {' or '.join(NAMES)}, not {name!r}; "
                         f"use data.loader=torch for it")


def image_size(d) -> int:
    """S (px) for the data section `d` (cfg.data)."""
    return d.image_size or _NATIVE[d.name]


def dali_info(d) -> DatasetInfo:
    """Classes (class folders / wnids.txt lines), 3 channels, S, ImageNet mean/std of the data section `d`
    (cfg.data); lists no images."""
    _check_name(d.name)
    if d.name == "imagenet":
        from torchvision.datasets.folder import find_classes

        split = "train" if os.path.isdir(os.path.join(d.root, "train")) else "val"
        try:
            classes, _ = find_classes(os.path.join(d.root, split))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset 'imagenet' not found at {d.root}: {e}. "
                                    f"{IMAGENET_HELP.format(root=d.root)}") from None
        n = len(classes)
    else:
        path = os.path.join(d.root, "wnids.txt")
        if not os.path.isfile(path):
            tiny_imagenet_files(d.root, "train")  # raises its FileNotFoundError with the layout help
        with open(path, encoding="utf-8") as fh:
            n = sum(1 for line in fh if line.strip())
    return DatasetInfo(n, 3, image_size(d), tf.IMAGENET_MEAN, tf.IMAGENET_STD)


def list_files(name: str, root: str, split: str) -> tuple[list[str], list[int]]:
    """(paths, class labels) of one split, in the torch loader's order."""
    _check_name(name)
    if name == "imagenet":
        ds, _ = build_dataset("imagenet", root, split, augment=False)  # scans, checks train/val classes
        samples = ds.folder.samples
    else:
        _, samples = tiny_imagenet_files(root, split)
    return [p for p, _ in samples], [int(y) for _, y in samples]


class DaliLoader:
    """Yields `(images, labels)` on `dist.device` from DALI pipelines; see the module docstring.

    d: the data section (cfg.data); seed: run.seed; channels_last: model.channels_last.
    sampler: the torch loader's TrainSampler (train) or None (val); `set_epoch(epoch, start_batch)`.
    last_indices: file indices (into `files`) of the batch yielded last, on the CPU.
    """

    def __init__(self, d, dist, split: str, files: list[str], labels: list[int], info: DatasetInfo, *,
                 seed: int, channels_last: bool, info_only: bool = False):
        self.split, self.files, self.info, self.info_only = split, files, info, info_only
        self.name, self.size = d.name, info.image_size
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.device = dist.device
        self.channels_last = channels_last
        self.augment = d.augment and split == "train"
        self.flip = d.hflip != "off"  # data.hflip=auto: imagenet and tiny_imagenet flip
        self.crop_pad = d.crop_pad
        self.hw_decoder_load = d.dali_hw_decoder_load
        self.threads = max(1, d.workers or _DEFAULT_THREADS)
        self.seed, self.rank, self.world = seed, dist.rank, dist.world
        self.last_indices: Optional[torch.Tensor] = None
        self._active: Optional[Iterator] = None
        if split == "train":
            self.batch = d.batch_size
            self.sampler: Optional[TrainSampler] = TrainSampler(len(files), dist.rank, dist.world, d.batch_size, seed)
            self.mine: list[int] = []
        else:
            self.batch = d.eval_batch_size or 2 * d.batch_size
            self.sampler = None
            self.mine = list(range(dist.rank, len(files), dist.world))

    @property
    def num_images(self) -> int:
        """Images in the whole split (all ranks)."""
        return len(self.files)

    def __len__(self) -> int:
        """Batches the next pass yields on this rank (train: the same on every rank)."""
        if self.sampler is not None:
            return self.sampler.batches - self.sampler.start
        return -(-len(self.mine) // self.batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's file indices of train epoch `epoch`, in reading order (TrainSampler's draw)."""
        s = TrainSampler(len(self.files), self.rank, self.world, self.batch, self.seed)
        s.set_epoch(epoch, 0)
        return [i for i, _ in s]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.info_only:
            raise RuntimeError("this DALI loader was built with info_only=True: it has no pipeline")
        if self._active is not None:  # a previous pass left unfinished (the loop stops at steps_per_epoch)
            self._active.close()
            self._active = None
        if self.sampler is not None:
            epoch, skip = self.sampler.epoch, self.sampler.start
            self.sampler.set_epoch(epoch + 1)  # iterating again without set_epoch: the next epoch
            indices = self.epoch_indices(epoch)
            seed = derive_seed(self.seed, epoch, self.rank) & _SEED_MASK
            policy = "DROP"
        else:
            indices, skip, seed, policy = self.mine, 0, 0, "PARTIAL"
        self._active = self._run(indices, skip, seed, policy)
        return self._active

    def _run(self, indices: list[int], skip: int, seed: int, policy: str):
        if not indices:  # a val rank with no image (world > images): nothing to yield
            return
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = _pipeline(self, [self.files[i] for i in indices], indices, seed)
        it = DALIGenericIterator([pipe], ["images", "ids"], reader_name=_READER,
                                 last_batch_policy=getattr(LastBatchPolicy, policy), auto_reset=False)
        nb = self.device.type == "cuda"
        try:
            for k, out in enumerate(_named_errors(it, self, indices)):
                if k < skip:  # resume: run the epoch's first batches, yield none of them
                    continue
                x, ids = out[0]["images"], out[0]["ids"].reshape(-1).to(torch.int64).cpu()
                if self.channels_last:  # DALI wrote NHWC: the same logical NCHW tensor, no copy
                    x = x.permute(0, 3, 1, 2)
                self.last_indices = ids
                yield x, self.labels[ids].to(self.device, non_blocking=nb)
        finally:
            del it, pipe  # frees the pipeline's threads and buffers before the next one is built


def _named_errors(it, loader: DaliLoader, indices: list[int]):
    """`it`'s batches; a pipeline error becomes a DataError naming the file (DALI names it for a cut
    JPEG, but not for every failure: "nvImageCodec failure: '#3'" is a slot of some batch in flight,
    so the batches that can be in flight are checked with the same decode as imnet.data.check)."""
    from imnet.data.check import check_file

    k = 0
    while True:
        try:
            out = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            text = str(e)
            lo, hi = k * loader.batch, (k + _PREFETCH + 1) * loader.batch
            why = (" ".join(line for line in text.splitlines() if "failure" in line or "Failed" in line)
                   or text.splitlines()[0])
            named = [loader.files[i] for i in indices if loader.files[i] in text]
            if named:  # DALI said which file
                path, problem = named[0], check_file(named[0])[0]
            else:  # a slot of a batch in flight: the first of their files the checker's decode fails on
                path, problem = next(((f, p) for f in (loader.files[i] for i in indices[lo:hi])
                                      if (p := check_file(f)[0])), (None, None))
            if path is not None:
                raise DataError(f"{path}: DALI cannot decode it ({problem or why.strip()}); find every bad file with "
                                "python -m imnet.data.check ROOT, or train with data.loader=torch "
                                "data.on_bad_image=skip") from e
            raise DataError(f"DALI failed on one of {hi - lo} files from {loader.files[indices[lo]]} on: "
                            f"{why.strip()}") from e
        yield out
        k += 1


def _pipeline(loader: DaliLoader, files: list[str], ids: list[int], seed: int):
    """One pass over `files` (read in order; the reader's label is the file index)."""
    try:
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise RuntimeError("data.loader=dali needs NVIDIA DALI: pip install -e \".[dali]\" "
                           f"(nvidia-dali-cuda120); import failed: {e}") from None
    gpu = loader.device.type == "cuda"
    device_id = None
    if gpu:
        device_id = loader.device.index if loader.device.index is not None else torch.cuda.current_device()
    S = loader.size
    mean = [255 * m for m in tf.IMAGENET_MEAN]  # DALI normalizes 0..255 pixels
    std = [255 * s for s in tf.IMAGENET_STD]
    layout = "HWC" if loader.channels_last else "CHW"
    decode_kw: dict[str, Any] = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
    if gpu:
        decode_kw.update(hw_decoder_load=loader.hw_decoder_load, jpeg_fancy_upsampling=True)
    linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)

    @pipeline_def(batch_size=loader.batch, num_threads=loader.threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=_PREFETCH)
    def pipe():
        jpegs, index = fn.readers.file(files=files, labels=ids, random_shuffle=False, pad_last_batch=True,
                                       name=_READER)
        mirror = None
        if loader.name == "imagenet" and loader.augment:
            images = fn.decoders.image_random_crop(jpegs, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decode_kw)
            images = fn.resize(images, size=[S, S], **linear)
            mirror = fn.random.coin_flip(probability=0.5) if loader.flip else None
        elif loader.name == "imagenet":
            images = fn.decoders.image(jpegs, **decode_kw)
            # torchvision Resize(R): short side R, long side int(R * long / short), from the header
            hw = fn.peek_image_shape(jpegs, adjust_orientation=False)
            h, w = hw[0], hw[1]
            short = dmath.min(h, w)
            R = round(S * 256 / 224)
            rh, rw = (R * h) // short, (R * w) // short
            images = fn.resize(images, resize_y=fn.cast(rh, dtype=types.FLOAT),
                               resize_x=fn.cast(rw, dtype=types.FLOAT), **linear)
            images = fn.slice(images, fn.stack(center_offset(rh, S), center_offset(rw, S)),
                              types.Constant([S, S], dtype=types.INT32), axis_names="HW")
        else:  # tiny_imagenet: the torch loader's in-memory recipe
            images = fn.decoders.image(jpegs, **decode_kw)
            images = fn.resize(images, size=[S, S], **linear)
            if loader.augment:
                p = tf.crop_pad(S) if loader.crop_pad is None else loader.crop_pad
                offset = fn.random.uniform(values=list(range(-p, p + 1)), shape=[2], dtype=types.INT32)
                images = fn.slice(images, offset, types.Constant([S, S], dtype=types.INT32), axis_names="HW",
                                  out_of_bounds_policy="pad", fill_values=0)
                mirror = fn.random.coin_flip(probability=0.5) if loader.flip else None
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std,
                                          **({"mirror": mirror} if mirror is not None else {}))
        return images, index

    return pipe()


def center_offset(size, S):
    """torchvision CenterCrop's offset int(round((size - S) / 2)), Python's half-to-even, as int32."""
    from nvidia.dali import fn, types

    d = size - S
    k = d // 2
    return fn.cast(k + (d - 2 * k) * (k - 2 * (k // 2)), dtype=types.INT32)  # +1 when d is odd and k is odd


def build(d, dist, split: str, *, seed: int, channels_last: bool, info_only: bool = False) -> DaliLoader:
    """The DALI loader of one split of the data section `d` (cfg.data) for this rank; seed: run.seed;
    channels_last: model.channels_last; `info_only`: list files, build no pipeline."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; choose train or val")
    _check_name(d.name)
    files, labels = list_files(d.name, d.root, split)
    info = dali_info(d)
    if not info_only:
        try:
            import nvidia.dali  # noqa: F401  (fail here, at build, rather than at the first batch)
        except ImportError as e:
            raise RuntimeError("data.loader=dali needs NVIDIA DALI: pip install -e \".[dali]\" "
                               f"(nvidia-dali-cuda120); import failed: {e}") from None
    return DaliLoader(d, dist, split, files, labels, info, seed=seed, channels_last=channels_last, info_only=info_only)
