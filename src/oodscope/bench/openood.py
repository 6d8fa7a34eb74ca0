"""The OpenOOD v1.5 protocols as data: image-list files relative to the data root, and where
that root is. Shared by the classifier benchmarks (`oodscope.bench.vision`) and the CLIP ones
(`oodscope.bench.clip`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OPENOOD_PROTOCOLS", "OpenOODProtocol", "openood_root"]


@dataclass(frozen=True)
class OpenOODProtocol:
    """An OpenOOD v1.5 benchmark: which image list holds each split and OOD set."""

    name: str
    num_classes: int
    image_size: int
    images: str  # images_classic or images_largescale
    lists: dict[str, str]  # split -> image list (train, val_id, test_id, val_ood)
    near: dict[str, str]
    far: dict[str, str]
    covariate: dict[str, str] = field(default_factory=dict)
    val_ood_description: str = ""
    list_roots: dict[str, str] = field(default_factory=dict)  # set -> images folder if different

    def needed(self, wants, covariate: bool = True) -> dict[str, str]:
        """The lists a run reads: every split, the OOD sets ``wants(name)`` accepts, and the
        covariate sets (when ``covariate``)."""
        needed = dict(self.lists)
        for k, v in {**self.near, **self.far}.items():
            if wants(k):
                needed[k] = v
        if covariate:
            needed.update(self.covariate)
        return needed

    def images_dir(self, root: Path, key: str) -> Path:
        return root / self.list_roots.get(key, self.images)


def _cifar_protocol(name: str, other: str, num_classes: int) -> OpenOODProtocol:
    b = f"benchmark_imglist/{name}"
    return OpenOODProtocol(
        name=name, num_classes=num_classes, image_size=32, images="images_classic",
        lists={"train": f"{b}/train_{name}.txt", "val_id": f"{b}/val_{name}.txt",
               "test_id": f"{b}/test_{name}.txt", "val_ood": f"{b}/val_tin.txt"},
        near={other: f"{b}/test_{other}.txt", "tin": f"{b}/test_tin.txt"},
        far={"mnist": f"{b}/test_mnist.txt", "svhn": f"{b}/test_svhn.txt",
             "texture": f"{b}/test_texture.txt", "places365": f"{b}/test_places365.txt"},
        val_ood_description="TinyImageNet images of classes held out from the near-OOD TIN test set "
                            "(OpenOOD v1.5 val_tin list)",
    )


def _imagenet_protocol(name: str, num_classes: int) -> OpenOODProtocol:
    b, i = f"benchmark_imglist/{name}", "benchmark_imglist/imagenet"
    return OpenOODProtocol(
        name=name, num_classes=num_classes, image_size=224, images="images_largescale",
        lists={"train": f"{b}/train_{name}.txt", "val_id": f"{b}/val_{name}.txt",
               "test_id": f"{b}/test_{name}.txt", "val_ood": f"{b}/val_openimage_o.txt"},
        near={"ssb_hard": f"{i}/test_ssb_hard.txt", "ninco": f"{i}/test_ninco.txt"},
        far={"inaturalist": f"{i}/test_inaturalist.txt", "textures": f"{i}/test_textures.txt",
             "openimage_o": f"{i}/test_openimage_o.txt"},
        covariate={f"{name}_v2": f"{b}/test_{name}_v2.txt", f"{name}_c": f"{b}/test_{name}_c.txt",
                   f"{name}_r": f"{b}/test_{name}_r.txt"},
        val_ood_description="OpenImage-O validation images disjoint from the OpenImage-O test list "
                            "(OpenOOD v1.5 val_openimage_o list)",
        list_roots={"textures": "images_classic"},
    )


OPENOOD_PROTOCOLS: dict[str, OpenOODProtocol] = {
    "cifar10": _cifar_protocol("cifar10", "cifar100", 10),
    "cifar100": _cifar_protocol("cifar100", "cifar10", 100),
    "imagenet200": _imagenet_protocol("imagenet200", 200),
    "imagenet": _imagenet_protocol("imagenet", 1000),
}


def openood_root(data_root: str | Path | None, needed: dict[str, str], benchmark: str) -> Path:
    """The OpenOOD v1.5 folder holding every list in ``needed`` (`find_dataset_dir`: the
    explicit ``data_root``, else ``$OODSCOPE_DATA/openood``, the user cache, system copies);
    a ``FileNotFoundError`` naming the missing files otherwise."""
    from ..data.registry import find_dataset_dir, search_paths

    found = find_dataset_dir("openood", list(needed.values()), data_root)
    if found is not None:
        return found
    where = Path(data_root).expanduser() if data_root is not None else search_paths("openood")[0]
    missing = [str(where / p) for p in needed.values() if not (where / p).exists()]
    raise FileNotFoundError(
        f"Benchmark {benchmark!r} needs the OpenOOD v1.5 image lists and images under {where} "
        "(set OODSCOPE_DATA, whose 'openood' folder is used, or pass --data-root). Missing:\n  "
        + "\n  ".join(missing)
        + "\nImages are expected beside them in images_classic/ or images_largescale/ as listed in "
        "those files (OpenOOD's download script produces exactly this layout).")
