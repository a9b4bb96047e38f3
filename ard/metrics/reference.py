"""Reference sets: FID statistics and features of real images, from an ADM reference batch or a dataset.

A `Reference` holds what the metrics compare samples against: `stats` (mean/covariance, for FID)
and `features` (for precision/recall), both for one extractor.

- reference_from_images: computed from uint8 NCHW images once, cached on disk as an .npz (atomic
  write) named and checked by the extractor's identity and the sha256 of the images' bytes.
- reference_from_adm_npz: an ADM evaluator reference batch (e.g. VIRTUAL_imagenet256_labeled.npz:
  arr_0 the 10,000 images NHWC, mu/sigma their pool_3 statistics). Its mu/sigma are used for FID
  when present (the ADM protocol; they belong to the Inception pool_3, so their dimension must match
  the extractor's), its images give the precision/recall features.
- load_npz_images / save_npz_images: the ADM batch layout (arr_0 uint8 NHWC) in and out; samples written
  by save_npz_images go straight into the official TF evaluator.
- check_npz_images: that a file is such a batch (an .npz archive whose arr_0 header says uint8 (N, H, W, 1|3)),
  from the header alone: cheap enough to run before any work, and nothing in the file is unpickled.
Files are read with np.load(allow_pickle=False), once check_npz_images has accepted them.
"""
from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ard.atomic import atomic_file, write_npz_atomic
from ard.data.digits import load_digits_split, to_uint8
from ard.metrics.features import FeatureExtractor, check_images, extract, nhwc_to_nchw
from ard.metrics.fid import FeatureStats
from ard.metrics.precision_recall import MIN_IMAGES, manifold_radii

CACHE_FORMAT = 1


@dataclass(frozen=True)
class Reference:
    """FID statistics and precision/recall features of a set of real images, for one extractor."""

    stats: FeatureStats  # mean/covariance for FID
    features: torch.Tensor  # (n, D) float32, for precision/recall
    identity: str  # "<extractor identity>/<sha256 prefix of the images>"
    _radii: dict = field(default_factory=dict, compare=False, repr=False)  # k -> k-NN radii, computed once

    def radii(self, k: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Distance of each reference feature to its k-th nearest neighbour (n,): the balls of precision,
        computed on first use and reused by every model scored against this reference."""
        if k not in self._radii:
            self._radii[k] = manifold_radii(self.features.to(device, torch.float32), k)
        return self._radii[k].to(device)


def images_digest(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and bytes: the data half of a cache key."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, extractor_id: str, data_id: str) -> Reference:
    try:
        with np.load(path, allow_pickle=False) as z:
            ok = int(z["format"]) == CACHE_FORMAT and str(z["extractor"]) == extractor_id and str(z["data"]) == data_id
            stats = FeatureStats(torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"]), int(z["n"]))
            features = torch.from_numpy(z["features"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable reference cache ({e}); delete it to recompute") from None
    if not ok:
        raise ValueError(f"{path}: reference cache written for another extractor/data; delete it to recompute")
    return Reference(stats, features, f"{extractor_id}/{data_id[:16]}")


def reference_from_images(images: torch.Tensor, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
                          batch_size: int = 500) -> Reference:
    """Reference of uint8 NCHW `images`; with `cache_dir`, read from / written to
    <cache_dir>/<extractor identity>-<images sha256[:16]>.npz."""
    check_images(images, extractor.channels, "reference images")
    data_id = images_digest(images)
    path = Path(cache_dir) / f"{extractor.identity}-{data_id[:16]}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        return _read_cache(path, extractor.identity, data_id)
    features, _ = extract(images, extractor, batch_size)  # (n, D)
    stats = FeatureStats.of(features)
    if path is not None:
        write_npz_atomic(path, format=np.array(CACHE_FORMAT), extractor=np.array(extractor.identity),
                          data=np.array(data_id), mu=stats.mu.numpy(), sigma=stats.sigma.numpy(),
                          n=np.array(stats.n), features=features.numpy())
    return Reference(stats, features, f"{extractor.identity}/{data_id[:16]}")


NPZ_IMAGES = ("an .npz archive (np.savez) whose arr_0 holds uint8 images (N, H, W, 1|3), like the ADM evaluator's "
              "reference batches (e.g. VIRTUAL_imagenet256_labeled.npz)")


def _npz_error(path: Path, what: str) -> ValueError:
    """The one-line error for a file that is not an ADM batch: the file, what is wrong, what is expected."""
    return ValueError(f"{path}: {what}; expected {NPZ_IMAGES}")


def check_npz_images(path: str | Path, minimum: int = 1) -> tuple[int, int, int, int]:
    """arr_0's shape (N, H, W, C) read from its .npy header, without loading the images (cheap before any work):
    refuses, in one line naming the file, anything but an .npz archive whose arr_0 is uint8 (N, H, W, 1|3) with
    N >= minimum. Nothing is unpickled: a pickle, or any file numpy would only open with allow_pickle, is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz not found: {path}")
    if not zipfile.is_zipfile(path):
        raise _npz_error(path, "not an .npz archive")
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
            version = np.lib.format.read_magic(member)
            if version not in headers:
                raise ValueError(f".npy format version {version}")
            shape, _, dtype = headers[version](member)
    except KeyError:
        raise _npz_error(path, "no arr_0") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise _npz_error(path, f"arr_0 is not a readable .npy array ({e})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise _npz_error(path, f"arr_0 must be uint8 (N, H, W, 1|3), got {dtype} {shape}")
    if shape[0] < minimum:
        raise _npz_error(path, f"arr_0 holds {shape[0]} images, at least {minimum} are needed")
    return shape


def _read_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of an .npz that holds them (those absent left out), read with allow_pickle=False."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in names if name in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise _npz_error(path, f"unreadable ({e})") from None


def load_npz_images(path: str | Path, minimum: int = 1) -> torch.Tensor:
    """arr_0 of an ADM-style .npz (uint8 (N, H, W, C), at least `minimum` images) as uint8 NCHW (N, C, H, W);
    checked by check_npz_images first."""
    path = Path(path)
    check_npz_images(path, minimum)
    return nhwc_to_nchw(_read_arrays(path, ("arr_0",))["arr_0"])


@contextmanager
def adm_npz_writer(path: str | Path, count: int, size: tuple[int, int],
                   labels: torch.Tensor | None = None) -> Iterator[Callable[[torch.Tensor], None]]:
    """An ADM-evaluator sample batch written batch by batch, atomically (ard.atomic.atomic_file): arr_0 uint8
    (N, H, W, 3) (grey repeated to RGB, as the TF evaluator expects) streamed into the zip as the batches come,
    then arr_1 the labels (N,) int64 when given; only the current batch is held in memory. The file appears
    when all `count` images are written; an error leaves no file (and an older one as it was).

        with adm_npz_writer(path, count, (H, W), labels) as write:
            for images in batches:      # uint8 NCHW
                write(images)
    """
    path, written = Path(path), 0

    def write(images: torch.Tensor) -> None:
        nonlocal written
        check_images(images, (1, 3), str(path))
        if tuple(images.shape[2:]) != tuple(size) or written + len(images) > count:
            raise ValueError(f"{path}: images {tuple(images.shape)} after {written} of {count} of size {tuple(size)}")
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # (b, 3, H, W)
        member.write(rgb.permute(0, 2, 3, 1).contiguous().numpy().tobytes())  # (b, H, W, 3), C order
        written += len(images)

    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as npz:
        with npz.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": (int(count), *map(int, size), 3)}
            np.lib.format.write_array_header_1_0(member, header)
            yield write
            if written != count:
                raise ValueError(f"{path}: {written} of {count} images written")
        if labels is not None:
            with npz.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels.to(torch.int64).numpy(), allow_pickle=False)  # (N,)


def save_npz_images(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 NCHW `images` as an ADM-evaluator sample batch (atomically): arr_0 uint8 (N, H, W, 3)
    (grey repeated to RGB, as the TF evaluator expects), and arr_1 the labels (N,) int64 when given."""
    check_images(images, (1, 3), str(path))
    with adm_npz_writer(path, len(images), tuple(images.shape[2:]), labels) as write:
        write(images)
    return Path(path)


def reference_from_adm_npz(path: str | Path, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
                           use_file_stats: bool = True, batch_size: int = 500,
                           image_size: tuple[int, int] | None = None) -> Reference:
    """Reference from an ADM reference batch: features of its arr_0 images; FID statistics from its
    mu/sigma when present and `use_file_stats` (ADM protocol), else from those features.
    image_size: (H, W) of the images it will be compared with (the evaluated samples); arr_0 must match."""
    path = Path(path)
    images = load_npz_images(path, MIN_IMAGES)  # (N, C, H, W)
    if image_size is not None and tuple(images.shape[2:]) != tuple(image_size):
        raise ValueError(f"{path}: arr_0 holds {images.shape[2]}x{images.shape[3]} images; the evaluated models "
                         f"make {image_size[0]}x{image_size[1]} images: a reference batch of that size is needed")
    try:
        reference = reference_from_images(images, extractor, cache_dir, batch_size)
    except ValueError as e:
        raise ValueError(f"{path}: arr_0 of shape (N, H, W, C) {tuple(images.permute(0, 2, 3, 1).shape)} does not "
                         f"suit {extractor.identity}: {e}") from None
    if not use_file_stats:
        return reference
    stats = _read_arrays(path, ("mu", "sigma"))
    if "mu" not in stats:
        return reference
    if "sigma" not in stats:
        raise ValueError(f"{path}: has mu but no sigma")
    mu, sigma = (torch.from_numpy(stats[k]).double() for k in ("mu", "sigma"))
    if mu.shape != (extractor.num_features,):
        raise ValueError(f"{path}: mu has shape {tuple(mu.shape)} but {extractor.identity} gives "
                         f"{extractor.num_features} features (the file's stats are the ADM Inception's pool_3; "
                         "pass use_file_stats=False to use statistics of arr_0's features)")
    return Reference(FeatureStats(mu, sigma, reference.stats.n), reference.features, reference.identity)


def digits_images(split: str = "all") -> torch.Tensor:
    """The real 8x8 digits of a split (ard.data.digits) as the metrics see them: uint8 (n, 1, 8, 8)."""
    return to_uint8(load_digits_split(split)[0])
