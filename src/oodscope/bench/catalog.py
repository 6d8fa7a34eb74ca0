"""Every registered benchmark, as a `BenchmarkSpec` instance, in one place.

``oodscope bench --list`` reads this module only: builders are named by their
``"module:function"`` path and imported when a benchmark runs, so listing needs neither torch
nor the text or CLIP stacks. `register_benchmark` adds a benchmark of your own.
"""

from __future__ import annotations

from .classsplit import FAR_NAME, FMNIST_CLASSES, NEAR_NAME, SPLITS
from .metacoco import METACOCO_SPLITS
from .mixoe import MIXOE_DATASETS
from .openood import ASCOOD_PROTOCOLS, OPENOOD_PROTOCOLS
from .spec import BenchmarkSpec

__all__ = ["GENERATED_VAL_OOD", "TEXT_DETECTORS", "VLM_DETECTORS", "get_benchmark", "list_benchmarks",
           "register_benchmark"]

#: the zero-shot detectors CLIP benchmarks run by default
VLM_DETECTORS = ("mcm", "glmcm", "neglabel", "adaneg")
#: the detectors text benchmarks run by default (those registered in this install)
TEXT_DETECTORS = ("msp", "maxlogit", "energy", "gen", "react", "knn", "mahalanobis", "rmds", "vim",
                  "residual", "nnguide", "relation")

GENERATED_VAL_OOD = (
    "Generated from held-out ID validation images (never from a test split): half patch-shuffled "
    "(each image cut into a 4×4 grid of patches, randomly permuted), half heavily blurred "
    "(repeated box blur)."
)
GENERATED_VAL_WHY = (
    "Hyperparameters must be chosen without seeing any test OOD set. These outliers keep the ID "
    "pixel statistics but destroy object shape, so they reward detectors that model what an ID "
    "object looks like, without resembling any test OOD set; tuning on a test OOD set itself would "
    "inflate its numbers."
)
OPENOOD_VAL_WHY = ("The OpenOOD v1.5 protocol: hyperparameters are chosen on this validation OOD set, "
                   "which shares no image with any test OOD set.")
TEXT_VAL_WHY = ("The release's validation out-of-scope queries; the test out-of-scope queries never take "
                "part in tuning.")

_IMAGES = "oodscope.bench.vision"
_SPLIT = "oodscope.bench.classsplit:build_class_split"
_TEXT = "oodscope.bench.text:build_text"
_CLIP = "oodscope.bench.clip"
_FMNIST_FAR = ("mnist", "kmnist", "notmnist", "gaussian-noise", "uniform-noise")


def _vision_specs() -> list[BenchmarkSpec]:
    specs = [BenchmarkSpec(
        "fashion-mnist",
        "ID Fashion-MNIST (reference CNN or --model); OOD MNIST, KMNIST/notMNIST if present, "
        "noise; covariate Fashion-MNIST-C; runs offline",
        f"{_IMAGES}:build_fashion_mnist", id_set="Fashion-MNIST (10 garment classes)",
        far=_FMNIST_FAR, covariate=("fashion-mnist-c",), val_ood=GENERATED_VAL_OOD,
        val_ood_reason=GENERATED_VAL_WHY, options={"model", "data_root"},
    )]
    split = dict(id_set="6 Fashion-MNIST classes", near=(NEAR_NAME,), far=(FAR_NAME,),
                 val_ood=GENERATED_VAL_OOD, options={"model", "data_root"},
                 val_ood_reason="The held-out classes are the near-OOD test set, so validation outliers "
                                "are generated from ID images instead.")
    specs.append(BenchmarkSpec(
        "fashion-mnist-c-stream",
        "Shifting stream (MOL's CAOOD setting): Fashion-MNIST-C held-out corruptions, severities 1->5, one "
        "stage each (ID test + MNIST under the same corruption, 5 labelled shots per class); training "
        "adds six other corruptions as domains; runs offline",
        "oodscope.bench.stream:build_fashion_mnist_stream", id_set="Fashion-MNIST (10 garment classes)",
        far=("mnist",), val_ood=GENERATED_VAL_OOD, val_ood_reason=GENERATED_VAL_WHY,
        default_detectors=("msp", "energy", "knn", "mahalanobis", "mol"), quick_subset=500,
        options={"model", "data_root"},
        params={"train_kinds": ("gaussian_noise", "shot_noise", "blur", "contrast", "brightness", "rotation"),
                "stream_kinds": ("impulse_noise", "pixelate", "jpeg"), "severities": (1, 2, 3, 4, 5),
                "per_domain": 600, "stage_size": 1000, "shots": 5}))
    specs.append(BenchmarkSpec(
        "fashion-mnist-split",
        "Fine-grained near-OOD: 6 Fashion-MNIST classes ID, the other 4 held out as near-OOD "
        "(fixed splits, split=0..2); far OOD MNIST; validation OOD generated from ID images",
        _SPLIT, params={"split": 0}, **split))
    for k, held in enumerate(SPLITS):
        names = ", ".join(FMNIST_CLASSES[c] for c in held)
        specs.append(BenchmarkSpec(
            f"fashion-mnist-split{k}",
            f"Fashion-MNIST class split {k}: near-OOD = held-out {names}; far OOD MNIST",
            _SPLIT, params={"split": k}, **split))
    for name, proto in OPENOOD_PROTOCOLS.items():
        groups = dict(near=tuple(proto.near), far=tuple(proto.far))
        specs.append(BenchmarkSpec(
            name,
            f"OpenOOD v1.5 {name}: near {'/'.join(proto.near)}, far {'/'.join(proto.far)}"
            + (f", covariate {'/'.join(proto.covariate)}" if proto.covariate else "")
            + "; needs --model (or --vlm) and the data",
            f"{_IMAGES}:build_openood", id_set=f"{name} ({proto.num_classes} classes)",
            covariate=tuple(proto.covariate), val_ood=proto.val_ood_description,
            val_ood_reason=OPENOOD_VAL_WHY, options={"model", "data_root", "vlm", "class_names"},
            params={"protocol": name}, vlm_twin=f"{name}-vlm", **groups))
        specs.append(BenchmarkSpec(
            f"{name}-vlm",
            f"OpenOOD v1.5 {name} with a CLIP model (--vlm): near {'/'.join(proto.near)}, far "
            f"{'/'.join(proto.far)}; needs the data and ID class names",
            f"{_CLIP}:build_openood_clip", modality="clip", id_set=f"{name} ({proto.num_classes} classes)",
            val_ood=proto.val_ood_description, val_ood_reason=OPENOOD_VAL_WHY,
            default_detectors=VLM_DETECTORS, options={"vlm", "class_names", "data_root"},
            params={"protocol": name, "train_per_class": 16}, **groups))
    specs.append(BenchmarkSpec(
        "images",
        "Your image folders and checkpoint: --id DIR (one sub-folder per class) --ood DIR [--ood DIR "
        "...] --model CKPT (oodscope safetensors+JSON or TorchScript)",
        f"{_IMAGES}:build_image_folders", id_set="the classes of --id", val_ood=GENERATED_VAL_OOD,
        val_ood_reason=GENERATED_VAL_WHY, options={"model"},
        params={"id_dir": None, "ood_dirs": (), "near_dirs": (), "val_fraction": 0.2, "test_fraction": 0.3}))
    return specs


def _clip_specs() -> list[BenchmarkSpec]:
    return [
        BenchmarkSpec(
            "vlm-imagefolder",
            "CLIP zero-shot on your folders: --id DIR (one sub-folder per class, names from the folders or "
            "--class-names) --ood DIR [--ood DIR ...]; needs --vlm",
            f"{_CLIP}:build_imagefolder_clip", modality="clip", id_set="the sub-folders of id_dir",
            val_ood=GENERATED_VAL_OOD, default_detectors=VLM_DETECTORS, options={"vlm", "class_names"},
            params={"id_dir": None, "ood_dirs": None, "near_ood": (), "train_dir": None, "val_ood_dir": None,
                    "train_fraction": 0.3, "val_fraction": 0.1}),
        BenchmarkSpec(
            "fashion-mnist-vlm", "CLIP zero-shot on Fashion-MNIST (OOD MNIST, noise); needs --vlm; runs offline",
            f"{_CLIP}:build_fashion_mnist_clip", modality="clip", id_set="Fashion-MNIST (class names)",
            far=("mnist", "gaussian-noise", "uniform-noise"), val_ood=GENERATED_VAL_OOD,
            val_ood_reason=GENERATED_VAL_WHY, default_detectors=VLM_DETECTORS, options={"vlm", "data_root"},
            params={"val_size": 2000, "noise_size": 2000}),
    ]


def _text_specs() -> list[BenchmarkSpec]:
    text = dict(modality="text", default_detectors=TEXT_DETECTORS, val_ood_reason=TEXT_VAL_WHY,
                options={"encoder", "finetune", "data_root"})
    head = "; sentence encoder + linear head"
    return [
        BenchmarkSpec(
            "clinc150", "CLINC150 intents (150 classes) vs its out-of-scope queries (near OOD)" + head,
            _TEXT, id_set="CLINC150 in-scope intents", near=("clinc150_oos",),
            val_ood="CLINC150 oos_val: out-of-scope queries (validation split)",
            params={"dataset": "clinc150", "variant": "full", "groups": {"oos": ("near", "clinc150_oos")}},
            **text),
        BenchmarkSpec(
            "banking77-oos", "BANKING77-OOS: 50 banking intents; near OOS id-oos (27 held-out banking "
            "intents), far OOS ood-oos (general queries)" + head,
            _TEXT, id_set="BANKING77-OOS in-scope intents", near=("id-oos",), far=("ood-oos",),
            val_ood="BANKING77-OOS id-oos/valid and ood-oos/valid (validation out-of-scope queries)",
            params={"dataset": "banking77-oos",
                    "groups": {"id-oos": ("near", "id-oos"), "ood-oos": ("far", "ood-oos")}},
            **text),
        *(BenchmarkSpec(
            f"clinc-single-domain-oos{suffix}", f"CLINC-Single-Domain-OOS ({domain}): 10 intents; near OOS "
            "id-oos (the domain's 5 held-out intents), far OOS ood-oos" + head,
            _TEXT, id_set=f"CLINC {domain} in-scope intents", near=("id-oos",), far=("ood-oos",),
            val_ood=f"CLINC-Single-Domain-OOS {domain} id-oos/valid and ood-oos/valid",
            params={"dataset": "clinc-single-domain-oos", "domain": domain,
                    "groups": {"id-oos": ("near", "id-oos"), "ood-oos": ("far", "ood-oos")}},
            **text) for domain, suffix in (("banking", ""), ("credit_cards", "-credit-cards"))),
        *(BenchmarkSpec(
            name, f"ROSTD{' (coarse labels)' if coarse else ''}: alarm/reminder/weather intents vs the "
            "authors' out-of-domain queries (near OOD)" + head,
            _TEXT, id_set="ROSTD in-domain intents", near=("rostd_ood",),
            val_ood="ROSTD eval.tsv outOfDomain rows (validation split)",
            params={"dataset": "rostd", "coarse": coarse, "groups": {"oos": ("near", "rostd_ood")}},
            **text) for name, coarse in (("rostd", False), ("rostd-coarse", True))),
        BenchmarkSpec(
            "text", "Your text data: --data DIR_OR_FILE (a CLINC150 / BANKING77-OOS / "
            "CLINC-Single-Domain-OOS / ROSTD folder, or a CSV/TSV/JSONL file with text and label "
            "columns)" + head,
            _TEXT, id_set="the in-scope labels of --data",
            val_ood="the validation out-of-scope queries of --data (a file: a seeded half of its "
                    "out-of-scope rows; the other half is the test set)",
            params={"dataset": "auto", "data": None, "text_column": "text", "label_column": "label",
                    "oos_label": "oos"},
            **text),
    ]


#: the detectors each seed-paper protocol runs by default (its paper's scores, those oodscope has)
_MIXOE_DETECTORS = ("msp", "maxlogit", "energy", "odin")
_ASCOOD_DETECTORS = {"waterbirds": ("msp", "energy", "odin", "iodin"), "celeba": ("msp", "energy", "odin", "iodin"),
                     "cars": ("msp", "energy", "relation", "knn"), "aircraft": ("msp", "energy", "nnguide", "knn")}
_PROBE_DETECTORS = ("msp", "maxlogit", "energy", "mahalanobis", "knn")
_FOLDERS = {"id_dir": None, "ood_dirs": (), "near_dirs": (), "val_fraction": 0.2, "test_fraction": 0.3}


def _seed_specs() -> list[BenchmarkSpec]:
    """The protocols of the seed papers: MixOE, ASCOOD, AnimalsMetaCoCo (SPROD), PT-OOD, NOVA."""
    specs = []
    for ds, (_, n_id, n_ood) in MIXOE_DATASETS.items():
        specs.append(BenchmarkSpec(
            f"mixoe-{ds}",
            f"MixOE fine-grained {ds} (WACV 2023 split files, split=0..): {n_id} ID classes; near OOD 'fine' = "
            f"the {n_ood} held-out classes, far OOD 'coarse' = the other MixOE datasets; needs --model and the data",
            "oodscope.bench.mixoe:build_mixoe", id_set=f"{n_id} {ds} classes drawn by MixOE's split seed",
            near=("fine",), far=("coarse",), val_ood=GENERATED_VAL_OOD,
            val_ood_reason="MixOE tunes on WebVision; generated outliers from ID-val images need no extra "
                           "download and touch no test set.",
            default_detectors=_MIXOE_DETECTORS, options={"model", "data_root"}, params={"dataset": ds, "split": 0}))
    for name, proto in ASCOOD_PROTOCOLS.items():
        setting = "spurious" if proto.num_classes == 2 else "fine-grained"
        specs.append(BenchmarkSpec(
            name,
            f"ASCOOD {setting} setting {name[7:]}: near {'/'.join(proto.near)}, far {'/'.join(proto.far)}; "
            "needs --model and ASCOOD's data",
            f"{_IMAGES}:build_openood", id_set=f"{name[7:]} ({proto.num_classes} classes)", near=tuple(proto.near),
            far=tuple(proto.far), val_ood=proto.val_ood_description, val_ood_reason=OPENOOD_VAL_WHY,
            default_detectors=_ASCOOD_DETECTORS[name[7:]], options={"model", "data_root"},
            params={"protocol": name}))
    for suffix, shots in (("", None), ("-5shot", 5)):
        specs.append(BenchmarkSpec(
            f"metacoco-animals{suffix}",
            "AnimalsMetaCoCo (MetaCoCo animals with spurious contexts, SPROD's protocol): 24 ID classes, 2 held out "
            f"as near OOD (split=0..{METACOCO_SPLITS - 1})" + (f", {shots} training images per class" if shots else "")
            + "; --model = a frozen backbone, linear-probed",
            "oodscope.bench.metacoco:build_metacoco", id_set="24 of the 26 animal classes", near=("animals_ood",),
            val_ood="10% of the held-out classes' images (SPROD's 'sp' validation source)",
            val_ood_reason="Disjoint from the 90% that form the test OOD set.",
            default_detectors=_PROBE_DETECTORS, options={"model", "data_root"},
            params={"split": 0, "shots": shots, "linear_probe": True, "probe_c": 1.0}))
    specs.append(BenchmarkSpec(
        "pt-ood",
        "PT-OOD: --model = a pre-trained backbone (frozen, linear-probed on --id DIR); --near DIR = familiar "
        "(pre-training) OOD, --ood DIR = other OOD",
        "oodscope.bench.ptood:build_ptood", id_set="the classes of --id", val_ood=GENERATED_VAL_OOD,
        val_ood_reason=GENERATED_VAL_WHY, default_detectors=_PROBE_DETECTORS, options={"model"},
        params={**_FOLDERS, "probe_c": 1.0}))
    specs.append(BenchmarkSpec(
        "nova",
        "NOVA brain MRI (evaluation only): --id DIR your ID scans and --model; far OOD NOVA's rare pathologies; "
        "--boxes FILE adds localisation mAP@30/50/[50:95] against its gold boxes",
        "oodscope.bench.nova:build_nova", id_set="the classes of --id (your brain MRI)", far=("nova",),
        val_ood=GENERATED_VAL_OOD, val_ood_reason=GENERATED_VAL_WHY, options={"model", "data_root"},
        params={"id_dir": None, "boxes": None, "val_fraction": 0.2, "test_fraction": 0.3}))
    return specs


_BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (*_vision_specs(), *_clip_specs(), *_text_specs(),
                                                              *_seed_specs())}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add (or replace) a benchmark; ``oodscope bench NAME`` and `run_benchmark` then find it."""
    if not isinstance(spec, BenchmarkSpec):
        raise TypeError(f"register_benchmark takes a BenchmarkSpec, got {type(spec).__name__}.")
    _BENCHMARKS[spec.name.lower()] = spec
    return spec


def get_benchmark(name: str) -> BenchmarkSpec:
    key = name.lower()
    if key not in _BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available: {sorted(_BENCHMARKS)}.")
    return _BENCHMARKS[key]


def list_benchmarks() -> list[str]:
    return sorted(_BENCHMARKS)
