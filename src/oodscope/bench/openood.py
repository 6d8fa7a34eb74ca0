"""Image-list protocols as data: the OpenOOD v1.5 ones and ASCOOD's, image-list files relative
to the data root, and where that root is (`release_root`, which every release-backed builder
uses to fail before any work with the list of missing files). Shared by the classifier
benchmarks (`oodscope.bench.vision`) and the CLIP ones (`oodscope.bench.clip`).

ASCOOD (Regmi, "Image-based Outlier Synthesis With Training Data", arXiv 2411.10794;
github.com/sudarshanregmi/ASCOOD, ``openood/evaluation_api/datasets.py`` at commit
fbd880cf5576e824477ea77ed451c06f6c7e9a52, ``DATA_INFO``) evaluates its spurious settings
(Waterbirds, CelebA; 2 classes, 224 px) and fine-grained settings (Cars, 150 classes; Aircraft,
90 classes; 448 px, the MixOE hold-out-class splits) in OpenOOD's layout: ID splits
``benchmark_imglist/<name>/<name>_{train,val,test}.txt`` over ``images_largescale/<name>/``,
near OOD the spurious / fine-grained list (``waterbirds_spurious_ood.txt`` over
``images_largescale/waterbirds_ood/``, ``celeba_spurious_ood.txt``,
``{cars,aircraft}_finegrained_ood.txt``), far OOD NINCO, OpenImage-O, SUN, Textures and
iNaturalist, validation OOD OpenImage-O's validation list (disjoint from its test list). The
list files themselves are in ASCOOD's Google-Drive archive (``benchmark_imglist`` id
1U65KbMfo5O8egsuTIOtRg7AxOGChsWVT in the same file), not in the repository, so their rows
could not be checked here; they are read as OpenOOD image lists (``path label`` per line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ASCOOD_PROTOCOLS", "LIST_PROTOCOLS", "OPENOOD_PROTOCOLS", "OpenOODProtocol", "openood_root",
           "release_root"]


@dataclass(frozen=True)
class OpenOODProtocol:
    """An image-list benchmark in OpenOOD's layout: which list holds each split and OOD set,
    and where its data folder is found (``dataset``) and obtained (``how_to_get``)."""

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
    dataset: str = "openood"  # the data folder's name under $OODSCOPE_DATA
    source: str = "OpenOOD v1.5"
    how_to_get: str = ("Images are expected beside them in images_classic/ or images_largescale/ as listed in "
                       "those files (OpenOOD's download script produces exactly this layout).")

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

_ASCOOD_HOW = ("Get them with ASCOOD's scripts/download/download_ascood.sh (github.com/sudarshanregmi/ASCOOD), "
               "which unpacks benchmark_imglist/ and images_largescale/<set>/ (images_classic/texture/ for "
               "Textures) into one data folder: pass that folder as --data-root or put it at "
               "$OODSCOPE_DATA/ascood.")


def _ascood_protocol(name: str, num_classes: int, image_size: int, near: str, near_list: str,
                     near_images: str) -> OpenOODProtocol:
    b, i2 = f"benchmark_imglist/{name}", "benchmark_imglist/imagenet200"
    ids = f"images_largescale/{name}"
    return OpenOODProtocol(
        name=f"ascood-{name}", num_classes=num_classes, image_size=image_size, images="images_largescale",
        lists={"train": f"{b}/{name}_train.txt", "val_id": f"{b}/{name}_val.txt",
               "test_id": f"{b}/{name}_test.txt", "val_ood": f"{i2}/val_openimage_o.txt"},
        near={near: f"{b}/{near_list}"},
        far={"ninco": f"{i2}/test_ninco.txt", "openimage_o": f"{i2}/test_openimage_o.txt",
             "sun": "benchmark_imglist/sun/sun.txt", "texture": "benchmark_imglist/cifar100/test_texture.txt",
             "inaturalist": f"{i2}/test_inaturalist.txt"},
        val_ood_description="OpenImage-O validation images (ASCOOD's imagenet200/val_openimage_o list), "
                            "disjoint from the OpenImage-O test list",
        list_roots={"train": ids, "val_id": ids, "test_id": ids, near: near_images, "texture": "images_classic"},
        dataset="ascood", source="ASCOOD", how_to_get=_ASCOOD_HOW,
    )


#: ASCOOD's spurious (Waterbirds, CelebA) and fine-grained (Cars, Aircraft) settings
ASCOOD_PROTOCOLS: dict[str, OpenOODProtocol] = {p.name: p for p in (
    _ascood_protocol("waterbirds", 2, 224, "waterbirds_ood", "waterbirds_spurious_ood.txt",
                     "images_largescale/waterbirds_ood"),
    _ascood_protocol("celeba", 2, 224, "celeba_ood", "celeba_spurious_ood.txt", "images_largescale/celeba"),
    _ascood_protocol("cars", 150, 448, "cars_ood", "cars_finegrained_ood.txt", "images_largescale/cars"),
    _ascood_protocol("aircraft", 90, 448, "aircraft_ood", "aircraft_finegrained_ood.txt",
                     "images_largescale/aircraft"),
)}
#: every image-list protocol by name (what ``params["protocol"]`` of a spec names)
LIST_PROTOCOLS: dict[str, OpenOODProtocol] = {**OPENOOD_PROTOCOLS, **ASCOOD_PROTOCOLS}


def release_root(dataset: str, needed: list[str], data_root: str | Path | None, benchmark: str, what: str,
                 how_to_get: str) -> Path:
    """The folder holding every path in ``needed`` (relative paths; `find_dataset_dir`: the explicit
    ``data_root`` or ``data_root/<dataset>``, else ``$OODSCOPE_DATA/<dataset>``, the user cache,
    system copies); otherwise a ``FileNotFoundError`` naming ``what`` is needed, every missing
    path, and ``how_to_get`` them. Builders call it before loading a network or reading images."""
    from ..data.registry import find_dataset_dir, search_paths

    found = find_dataset_dir(dataset, list(needed), data_root)
    if found is not None:
        return found
    where = Path(data_root).expanduser() if data_root is not None else search_paths(dataset)[0]
    missing = [str(where / p) for p in needed if not (where / p).exists()]
    raise FileNotFoundError(
        f"Benchmark {benchmark!r} needs {what} under {where} (set OODSCOPE_DATA, whose {dataset!r} folder "
        "is used, or pass --data-root). Missing:\n  " + "\n  ".join(missing) + "\n" + how_to_get)


def openood_root(data_root: str | Path | None, needed: dict[str, str], benchmark: str,
                 proto: OpenOODProtocol | None = None) -> Path:
    """The folder holding every list in ``needed`` for an image-list protocol (`release_root`)."""
    dataset = proto.dataset if proto is not None else "openood"
    source = proto.source if proto is not None else "OpenOOD v1.5"
    how = proto.how_to_get if proto is not None else OpenOODProtocol.how_to_get
    return release_root(dataset, list(needed.values()), data_root, benchmark,
                        f"the {source} image lists and images", how)
