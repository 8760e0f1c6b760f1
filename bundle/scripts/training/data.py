"""Training data: the datalist (checked before anything is cached) and the transforms that turn volumes into samples.

Volumes are 3D and channel first ``(1, X, Y, Z)`` in RAS, so axis 2 (the last one) is the axial
thick-slice axis that the degradation simulates and the networks expect last.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import LoadImage, MapTransform, Randomizable, SpatialCrop, Transform
from monai.utils import convert_to_tensor

from ..inference import NIFTI_SUFFIXES, CheckScand
from ..networks.inputs import declared_clean
from ..networks.volume import output_size

SPLIT_FOLDERS = {"training": "train", "validation": "val"}
ACQUISITION_KEYS = ("scale", "motion", "acceleration")


def check_volume_file(path: str | os.PathLike) -> None:
    """Raise a clear error naming ``path`` unless it exists and loads as one finite 3D volume."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"volume '{path}' does not exist (or is not a file).")
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    CheckScand(keys="image")({"image": image})


def load_datalist(datalist: str | os.PathLike | None, dataset_dir: str | os.PathLike | None, split: str) -> list[dict]:
    """The ``split`` items (``"training"`` or ``"validation"``), every volume checked before training starts.

    From the MONAI datalist JSON ``datalist`` when given (relative paths are relative to the JSON
    file), else the NIfTI files of ``dataset_dir/train`` or ``dataset_dir/val``.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {tuple(SPLIT_FOLDERS)}, got {split!r}.")
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist '{datalist}' does not exist; expected a MONAI datalist JSON file.")
        items = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=split)
        source = f"datalist '{datalist}' ('{split}')"
    else:
        folder = Path(dataset_dir or "") / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"'{folder}' is not a folder: set dataset_dir to a folder holding train/ and val/ NIfTI volumes, "
                "or datalist to a MONAI datalist JSON."
            )
        items = [{"image": str(p)} for p in sorted(folder.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)]
        source = f"'{folder}'"
    if not items:
        raise ValueError(f"{source} lists no volumes.")
    for item in items:
        if "image" not in item:
            raise ValueError(f"{source}: item {item} has no 'image' entry.")
        check_volume_file(item["image"])
    return items


def kspace_dropout_prob(kspace_dropout: float, augment_prob: float) -> float:
    """``kspace_dropout`` (the probability that stage 2 trains without the measured k-space), checked.

    The slice augmentations (flips, rotations, intensity scaling) move and rescale the image, not
    its k-space, so samples that keep their k-space must not be augmented.
    """
    kspace_dropout, augment_prob = float(kspace_dropout), float(augment_prob)
    if not 0.0 <= kspace_dropout <= 1.0:
        raise ValueError(f"kspace_dropout must be a probability in [0, 1], got {kspace_dropout}.")
    if kspace_dropout < 1.0 and augment_prob > 0.0:
        raise ValueError(
            f"kspace_dropout {kspace_dropout} keeps the measured k-space for some samples, but augment_prob "
            f"{augment_prob} flips, rotates and rescales their images and not their k-space; set augment_prob 0 "
            "to train with k-space, or kspace_dropout 1 (images only, like NIfTI and DICOM scans)."
        )
    return kspace_dropout


class AcquisitionParametersd(MapTransform):
    """Copy the simulated ``scale``, ``motion`` and nominal ``acceleration`` of ``key`` to top-level entries.

    Also ``clean``: whether that acquisition counts as declared clean (R = 1, no motion; see
    :func:`scripts.networks.inputs.declared_clean`). The networks take them as inputs, and plain
    entries survive batching and on-disk caching, where the image's metadata does not.
    """

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            acquisition = d[key].meta.get("acquisition", {}) if isinstance(d[key], MetaTensor) else {}
            missing = [name for name in ACQUISITION_KEYS if name not in acquisition]
            if missing:
                raise ValueError(f"'{key}' has no simulated {missing} in meta['acquisition']; simulate it first.")
            d.update({name: float(acquisition[name]) for name in ACQUISITION_KEYS})
            d["clean"] = bool(declared_clean(d["acceleration"], d["motion"], 1, torch.device("cpu"))[0])
        return d


class CropToOutputd(MapTransform):
    """Crop the fine volumes ``keys`` along the slice axis to the reconstruction grid of the stack ``stack_key``.

    Output voxel ``j`` of the stage-3 INR sits at fine index ``j`` exactly (see
    :func:`scripts.networks.volume.output_positions`), so the target is the first
    ``round(num_slices * scale)`` fine slices; ``scale`` is the entry set by :class:`AcquisitionParametersd`.
    """

    def __init__(self, keys: KeysCollection, stack_key: str = "image") -> None:
        super().__init__(keys)
        self.stack_key = stack_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        size = output_size(d[self.stack_key].shape[-1], d["scale"])
        for key in self.key_iterator(d):
            if d[key].shape[-1] < size:
                raise ValueError(f"'{key}' has {d[key].shape[-1]} slices, fewer than the {size} of the output grid.")
            d[key] = d[key][..., :size]
        return d


class RandInPlaneCropd(Randomizable, MapTransform):
    """Crop the same random in-plane window ``roi_size`` (first two spatial axes) from every key, all slices kept.

    Stage 3's pool simulates each acquisition on a whole-head field of view, as a scan is, since
    motion ghosts move by a fraction of the field of view; this draws a training window from it.
    The keys may differ along the slice axis (the thick stack and the fine target), which MONAI's
    ``RandSpatialCropd`` cannot do: it sizes every key's crop from the first key, depth included.
    """

    def __init__(self, keys: KeysCollection, roi_size: tuple[int, int]) -> None:
        MapTransform.__init__(self, keys)
        self.roi_size = tuple(int(size) for size in roi_size)
        if len(self.roi_size) != 2 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be two positive in-plane sizes, got {roi_size}.")
        self._start: tuple[int, int] = (0, 0)

    def randomize(self, in_plane: tuple[int, int]) -> None:
        self._start = tuple(
            int(self.R.randint(0, size - roi + 1)) for size, roi in zip(in_plane, self.roi_size, strict=True)
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        shapes = {key: tuple(d[key].shape[1:3]) for key in self.key_iterator(d)}
        if len(set(shapes.values())) != 1 or any(
            s < r for s, r in zip(next(iter(shapes.values())), self.roi_size, strict=True)
        ):
            raise ValueError(f"keys need one in-plane size of at least {self.roi_size}, got {shapes}.")
        self.randomize(next(iter(shapes.values())))
        crop = SpatialCrop(
            roi_slices=[slice(start, start + size) for start, size in zip(self._start, self.roi_size, strict=True)]
        )
        for key in shapes:
            d[key] = crop(d[key])
        return d


class RandSliceSamplesd(Randomizable, MapTransform):
    """Draw ``num_samples`` slices (last axis) of the stacks ``keys``; return one sample per slice.

    The same slices are taken from every key, as plain ``(C, H, W)`` tensors; a key of size 1 along
    the slice axis (a sampling mask) is shared by all slices; the other entries are copied into every
    sample. MONAI's DataLoader flattens the lists, so a batch of ``B`` volumes holds ``B * num_samples``
    slices from ``B`` different degradations. Slices are distinct unless the stack has fewer than
    ``num_samples``.
    """

    def __init__(self, keys: KeysCollection, num_samples: int) -> None:
        MapTransform.__init__(self, keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples = num_samples
        self._indices: list[int] = []

    def randomize(self, num_slices: int) -> None:
        replace = self.num_samples > num_slices
        self._indices = self.R.choice(num_slices, self.num_samples, replace=replace).tolist()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        # plain tensors: a slice has no 3D affine
        stacks = {key: convert_to_tensor(data[key], track_meta=False) for key in self.key_iterator(data)}
        lengths = {stack.shape[-1] for stack in stacks.values()}
        if lengths - {1, max(lengths)}:
            raise ValueError(f"keys {list(stacks)} must have the same number of slices (or 1), got {sorted(lengths)}.")
        self.randomize(max(lengths))
        samples = []
        for index in self._indices:
            sample = {k: v for k, v in data.items() if k not in stacks}
            sample.update({key: stack[..., index if stack.shape[-1] > 1 else 0] for key, stack in stacks.items()})
            samples.append(sample)
        return samples


class FixedRandomd(Transform):
    """Apply the random ``transform`` with its random state seeded from the item's ``seed_key`` entry.

    The result is a fixed function of the item, so a pool of degraded samples can be cached on disk
    (MONAI's ``PersistentDataset`` caches every transform up to the first random one, and this one is not).
    """

    def __init__(self, transform: Randomizable, seed_key: str = "seed") -> None:
        self.transform = transform
        self.seed_key = seed_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        self.transform.set_random_state(seed=int(data[self.seed_key]))
        return self.transform(data)
