"""PT-OOD: a frozen pre-trained backbone, a linear probe on the ID classes, and familiar OOD.

Miyai, Yu, Irie, Aizawa, "Can Pre-trained Networks Detect Familiar Out-of-Distribution Data?"
(arXiv 2310.00847). PT-OOD ("pre-trained OOD") data are OOD inputs the backbone saw during
pre-training: the study linear-probes supervised and self-supervised backbones on an ID task,
finds that logit scores of the probe miss PT-OOD (it is not linearly separable from ID in the
frozen feature space) and proposes detecting in the feature space, independent of the probe's
decision boundary (kNN on normalised features). The authors' repository
(github.com/AtsuMiyai/PT-OOD, README at 0163f578cc5c5cdaabdd819f2b0acbe46e92ff47) says code and
data will be published upon acceptance; the submission was withdrawn, so neither the ID/PT-OOD
dataset lists nor the probe recipe could be read. The protocol here is therefore folder-based:

* ``--model``: the pre-trained backbone (an oodscope checkpoint or a TorchScript file); its
  features are the input of its last linear layer (or its output when it has none). It is
  frozen: it runs once per split.
* ``--id DIR``: ID images, one sub-folder per class, cut (stratified, seeded) into train /
  ID-val / test ID; a linear probe (`oodscope.train.linear_probe`) is fitted on the train
  features and gives every split its logits and head.
* ``--near DIR`` (repeatable): PT-OOD sets, images from the backbone's pre-training
  distribution that are not ID classes (e.g. ImageNet classes disjoint from ID for an
  ImageNet-pre-trained backbone); ``--ood DIR``: other (non-familiar) OOD sets, as far OOD.
* validation OOD: generated from ID-val images (never a test set).

Detectors that re-run the network (ODIN, GradNorm, ...) are not offered: the network's own
outputs are not the probe's logits.
"""

from __future__ import annotations

from dataclasses import replace

from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["build_ptood", "probe_feature_set"]

def probe_feature_set(fs: FeatureSet, C: float = 1.0, seed: int = 0) -> FeatureSet:
    """``fs`` with a linear probe fitted on ``fs.train`` (features, labels) applied to every
    split. A backbone without a last linear layer gave no features: its output is used."""
    from ..metrics import accuracy
    from ..train.linear_probe import apply_linear_probe, fit_linear_probe

    def backbone(f):
        return f if f.features is not None else f.replace(features=f.logits, logits=None, head_weight=None,
                                                          head_bias=None)

    train = backbone(fs.train)
    weight, bias = fit_linear_probe(train.features, train.labels, C=C, seed=seed)

    def probe(f):
        return apply_linear_probe(backbone(f), weight, bias)

    out = replace(fs, train=probe(fs.train), val_id=probe(fs.val_id), val_ood=probe(fs.val_ood),
                  test_id=probe(fs.test_id), near_ood={k: probe(v) for k, v in fs.near_ood.items()},
                  far_ood={k: probe(v) for k, v in fs.far_ood.items()},
                  covariate={k: probe(v) for k, v in fs.covariate.items()}, info=dict(fs.info))
    out.info["linear_probe"] = {"C": C, "feature_dim": int(weight.shape[1]), "classes": int(weight.shape[0]),
                                "train_accuracy": float(accuracy(out.train.logits, out.train.labels))}
    return out


def build_ptood(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """``bench pt-ood``: backbone features of your folders, a linear probe, familiar-OOD sets."""
    from .extract import ImageExtractor, load_network, model_normalization
    from .vision import _feature_set, check_folder_params, image_folder_splits, imagenet_normalization, input_shape

    check_folder_params(spec)
    if options.net is None and options.model is None:
        raise ValueError(f"Benchmark {spec.name!r} needs --model: the pre-trained backbone whose frozen features "
                         "are linear-probed (an oodscope checkpoint or a TorchScript file).")
    net, meta, source = load_network(options, benchmark=spec.name)
    shape = input_shape(net, meta, source)
    sp = image_folder_splits(spec, options, shape)
    mean, std = model_normalization(meta, *imagenet_normalization(shape[0]))
    ex = ImageExtractor(net, mean, std, options)
    fs = probe_feature_set(_feature_set(ex, sp, near=sp["near"], far=sp["far"]), C=spec.params["probe_c"],
                           seed=options.seed)
    fs.info.update(model=f"{source} (frozen backbone + linear probe)", normalization={"mean": mean, "std": std},
                   ood_descriptions={**{k: "PT-OOD (familiar to the backbone)" for k in sp["near"]},
                                     **{k: "OOD not from the pre-training data" for k in sp["far"]}},
                   notes=[f"ID classes from {spec.params['id_dir']}: {', '.join(sp['classes'])}"], **ex.info())
    return fs
