"""VLM plumbing with a tiny randomly initialised CLIP (plumbing only: no real weights).

A tiny Hugging Face ``CLIPModel`` (2-layer towers, 16-d joint space) and a character-level
``CLIPTokenizer`` built from a generated vocabulary are saved to a temp dir, so the real
loading path (``vlm.load("hf:<dir>")``) runs with no network. Also: WordNet reader, word
lists, the feature cache, the benchmark providers and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import oodscope as ood

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def build_tiny_clip(directory: Path, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz.")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=48,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip")
    model, tok = build_tiny_clip(d)
    enc = ood.vlm.load(f"hf:{d}")
    return dict(dir=d, model=model, tok=tok, enc=enc)


def _images(n, seed=0, size=(40, 50)):
    return (np.random.default_rng(seed).random((n, *size, 3)) * 255).astype(np.uint8)


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------ backends
def test_load_resolves_hf_dir_and_plain_dir(tiny):
    enc = tiny["enc"]
    assert isinstance(enc, ood.vlm.HFCLIPEncoder)
    assert enc.embed_dim == 16 and enc.image_size == 32
    assert ood.vlm.load(str(tiny["dir"])).embed_dim == 16
    assert ood.vlm.load(enc) is enc
    assert enc.logit_scale == pytest.approx(float(tiny["model"].logit_scale.detach().exp()))


def test_unresolvable_model_string_names_installed_backends(tmp_path):
    with pytest.raises(ValueError, match="Installed backends: hf"):
        ood.vlm.load("definitely-not-a-model")
    with pytest.raises(ValueError, match="Installed backends"):
        ood.vlm.load(f"hf:{tmp_path / 'missing'}")
    if not ood.vlm.available_backends()["open_clip"]:
        with pytest.raises(ValueError, match="open_clip is not installed"):
            ood.vlm.load("open_clip:ViT-B-16/laion2b_s34b_b88k")


def test_text_embeddings_match_the_model(tiny):
    enc, model, tok = tiny["enc"], tiny["model"], tiny["tok"]
    texts = ["cat", "dog", "tree"]
    emb = enc.encode_text(texts, ["a photo of a {}."])
    ref = []
    for t in texts:  # one at a time: no padding involved
        ids = tok(["a photo of a " + t + "."], return_tensors="pt")
        with torch.no_grad():
            ref.append(_pooled(model.get_text_features(**ids))[0].numpy())
    ref = np.asarray(ref)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    # template ensembling: normalised mean of the per-template embeddings
    a = enc.encode_text(texts, ["a photo of a {}."])
    b = enc.encode_text(texts, ["the {}"])
    both = enc.encode_text(texts, ["a photo of a {}.", "the {}"])
    mean = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(both, mean, atol=1e-5)
    with pytest.raises(ValueError, match="templates"):
        enc.encode_text(texts, ["no placeholder"])


def test_text_cache_on_disk(tiny, tmp_path):
    enc = ood.vlm.load(f"hf:{tiny['dir']}", cache_dir=tmp_path)
    first = enc.encode_text(["cat", "dog"], ["{}"])
    assert len(list(tmp_path.glob("text-*.npy"))) == 1
    enc2 = ood.vlm.load(f"hf:{tiny['dir']}", cache_dir=tmp_path)
    enc2._encode_tokens = lambda texts: (_ for _ in ()).throw(AssertionError("tower ran"))
    np.testing.assert_array_equal(enc2.encode_text(["cat", "dog"], ["{}"]), first)


def test_image_embeddings_match_the_model_and_local_value_path(tiny):
    enc, model = tiny["enc"], tiny["model"]
    pixels = enc.preprocess(list(_images(3)))
    assert pixels.shape == (3, 3, 32, 32)
    g, loc = enc.encode_images(pixels, local=True)
    with torch.no_grad():
        ref = _pooled(model.get_image_features(pixel_values=torch.tensor(pixels))).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(g, ref, atol=1e-5)
    assert loc.shape == (3, 16, 16)  # (32/8)^2 patches
    # independent reference for the value path: run HF's own last layer with its attention
    # replaced by out_proj(v_proj(.)), then post-layernorm and projection of the patches
    last = model.vision_model.encoder.layers[-1]
    attn = last.self_attn
    original = attn.forward

    def value_only(hidden_states, *args, **kwargs):
        return attn.out_proj(attn.v_proj(hidden_states)), None

    attn.forward = value_only
    try:
        with torch.no_grad():
            out = model.vision_model(pixel_values=torch.tensor(pixels), return_dict=True)
            ref_loc = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
    finally:
        attn.forward = original
    ref_loc = ref_loc.numpy()
    ref_loc /= np.linalg.norm(ref_loc, axis=-1, keepdims=True)
    np.testing.assert_allclose(loc, ref_loc, atol=1e-5)
    # "tokens" mode: the plain last-layer tokens
    enc_tok = ood.vlm.HFCLIPEncoder(model, tiny["tok"], local_mode="tokens")
    _, loc_tok = enc_tok.encode_images(pixels, local=True)
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.tensor(pixels), return_dict=True)
        ref_tok = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])).numpy()
    ref_tok /= np.linalg.norm(ref_tok, axis=-1, keepdims=True)
    np.testing.assert_allclose(loc_tok, ref_tok, atol=1e-5)
    assert not np.allclose(loc_tok, loc, atol=1e-3)


def test_preprocessing_accepts_pil_grey_float_and_chw(tiny):
    from PIL import Image

    enc = tiny["enc"]
    rgb = _images(1)[0]
    a = enc.preprocess([Image.fromarray(rgb)])
    b = enc.preprocess([rgb])
    c = enc.preprocess([rgb.astype(np.float32) / 255.0])
    d = enc.preprocess([np.moveaxis(rgb, -1, 0)])
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)
    np.testing.assert_allclose(a, d)
    grey = enc.preprocess(np.zeros((2, 28, 28), np.uint8))
    assert grey.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.preprocess([rgb.astype(np.float32)])


# ------------------------------------------------------------------------------ extract
def test_extract_features_labels_and_cache(tiny, tmp_path):
    enc = tiny["enc"]
    imgs, y = _images(7), np.array([0, 1, 2, 0, 1, 2, 0])
    f = ood.vlm.extract(enc, (imgs, y), local=True, batch_size=3, progress=False, cache_dir=tmp_path)
    assert f.extras["image_embeds"].shape == (7, 16)
    assert f.extras["local_embeds"].shape == (7, 16, 16) and f.extras["local_embeds"].dtype == np.float16
    np.testing.assert_array_equal(f.labels, y)
    np.testing.assert_allclose(np.linalg.norm(f.extras["image_embeds"], axis=1), 1.0, atol=1e-5)
    # batching does not change the result
    g = ood.vlm.extract(enc, imgs, batch_size=7, progress=False)
    np.testing.assert_allclose(g.extras["image_embeds"], f.extras["image_embeds"], atol=1e-5)
    assert g.labels is None and "local_embeds" not in g.extras
    # the cache answers without running the image tower
    assert len(list(tmp_path.glob("vlm-features-*.npz"))) == 1
    enc.encode_images, saved = (lambda *a, **k: (_ for _ in ()).throw(AssertionError("tower ran"))), enc.encode_images
    try:
        h = ood.vlm.extract(enc, (imgs, y), local=True, batch_size=3, progress=False, cache_dir=tmp_path)
    finally:
        enc.encode_images = saved
    np.testing.assert_array_equal(h.extras["image_embeds"], f.extras["image_embeds"])


def test_extract_from_files_and_preprocessed_tensors(tiny, tmp_path):
    from PIL import Image

    enc = tiny["enc"]
    paths = []
    for i, im in enumerate(_images(4, seed=3)):
        p = tmp_path / f"{i}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    f = ood.vlm.extract(enc, paths, batch_size=3, progress=False)
    pixels = torch.tensor(enc.preprocess(list(_images(4, seed=3))))
    loader = [(pixels[:2], torch.tensor([0, 1])), (pixels[2:], torch.tensor([1, 0]))]
    g = ood.vlm.extract(enc, loader, progress=False)
    np.testing.assert_allclose(f.extras["image_embeds"], g.extras["image_embeds"], atol=1e-5)
    np.testing.assert_array_equal(g.labels, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="no images"):
        ood.vlm.extract(enc, [], progress=False)


# ------------------------------------------------------------------------------ detectors end to end
def test_all_detectors_run_on_a_tiny_clip(tiny):
    enc = tiny["enc"]
    names = ["cat", "dog", "car"]
    f = ood.vlm.extract(enc, (_images(12), np.arange(12) % 3), local=True, progress=False)
    words = ["tree", "house", "boat", "sky", "river", "stone", "cloud", "cat"]
    dets = {
        "mcm": ood.create("mcm", encoder=enc, class_names=names).fit(),
        "glmcm": ood.create("glmcm", encoder=enc, class_names=names).fit(),
        "neglabel": ood.create("neglabel", encoder=enc, class_names=names, words=words,
                               n_negatives=4, n_groups=2).fit(),
        "adaneg": ood.create("adaneg", encoder=enc, class_names=names, words=words,
                             n_negatives=4, n_groups=2).fit(),
        "clipn": ood.create("clipn", encoder=enc, class_names=names, no_encoder=enc,
                            no_templates=["a photo without a {}."]).fit(),
        "cooked": ood.create("cooked", encoder=enc, class_names=names, probe_epochs=3).fit(f),
    }
    assert "cat" not in dets["neglabel"].neg_words_  # an ID name is never a negative
    assert len(dets["neglabel"].neg_words_) == 4
    f_logits = f.replace(logits=np.random.default_rng(0).standard_normal((12, 3)))
    for name, det in dets.items():
        s = det.score(f_logits)
        assert s.shape == (12,) and np.all(np.isfinite(s)), name
    # detectors given an encoder string resolve it themselves
    s = ood.create("mcm", encoder=f"hf:{tiny['dir']}", class_names=names).fit().score(f)
    np.testing.assert_allclose(s, dets["mcm"].score(f), atol=1e-6)


def test_encoder_path_equals_precomputed_text_embeddings(tiny):
    """Detectors built from an encoder give the same scores as from the arrays it produces.

    (A random tiny CLIP embeds all prompts almost identically, cos ~0.95, so a sign test on
    its geometry would test the random weights, not the code; the sign tests live in
    test_vlm.py on hand-made embeddings.)"""
    enc = tiny["enc"]
    names, words = ["cat", "dog", "car"], ["tree", "house", "boat", "sky", "river"]
    f = ood.vlm.extract(enc, _images(6, seed=9), progress=False)
    text = enc.encode_text(names, ["a photo of a {}."])
    a = ood.create("mcm", encoder=enc, class_names=names).fit().score(f)
    b = ood.create("mcm", text_embeds=text).fit().score(f)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    nice_text = enc.encode_text(names, ["The nice {}."])
    nice_words = enc.encode_text(words, ["The nice {}."])
    a = ood.create("neglabel", encoder=enc, class_names=names, words=words, n_negatives=3,
                   n_groups=1).fit()
    b = ood.create("neglabel", text_embeds=nice_text, neg_text_embeds=nice_words, words=words,
                   n_negatives=3, n_groups=1).fit()
    assert a.neg_words_ == b.neg_words_
    np.testing.assert_allclose(a.score(f), b.score(f), rtol=1e-12)


@pytest.mark.skipif(not ood.vlm.available_backends()["open_clip"], reason="open_clip not installed")
def test_open_clip_backend_tiny():
    import open_clip

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )
    enc = ood.vlm.OpenCLIPEncoder(model, open_clip.get_tokenizer("ViT-B-16"), name="tiny-open-clip")
    pixels = enc.preprocess(list(_images(2)))
    g, loc = enc.encode_images(pixels, local=True)
    assert g.shape == (2, 16) and loc.shape == (2, 16, 16)
    assert enc.encode_text(["cat"], ["{}"]).shape == (1, 16)


# ------------------------------------------------------------------------------ word lists
TINY_WORDNET = """  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  
00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept  
00020103 00 s 02 outback(a) 0 remote 0 003 & 00019874 a 0000 | inaccessible;  
00020410 00 s 0a unapproachable 0 unreachable 0 unreached 0 out_of_reach(p) 0 w1 0 w2 0 w3 0 w4 0 w5 0 w6 0 001 & 00019874 a 0000 | far away  
00002138 03 n 01 entity 0 000 | a duplicate lemma  
"""


def test_wordnet_reader_on_a_tiny_file(tmp_path):
    from oodscope.vlm.wordnet import read_wordnet_data, wordnet_words

    (tmp_path / "data.noun").write_text(TINY_WORDNET)
    (tmp_path / "data.adj").write_text("  1 header\n00000001 00 a 01 able 0 000 | having the means\n")
    words = read_wordnet_data(tmp_path / "data.noun")
    assert words == ["entity", "abstraction", "abstract entity", "outback", "remote", "unapproachable",
                     "unreachable", "unreached", "out of reach", "w1", "w2", "w3", "w4", "w5", "w6"]
    both = wordnet_words(("noun", "adj"), path=tmp_path)
    assert both[-1] == "able" and len(both) == len(words) + 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.noun").write_text("00001740 03 n zz entity 0 000 | x\n")
    with pytest.raises(ValueError, match="not a WordNet data line"):
        read_wordnet_data(tmp_path / "bad" / "data.noun")
    with pytest.raises(ValueError, match="does not exist"):
        read_wordnet_data(tmp_path / "nothing.noun")
    with pytest.raises(ValueError, match="pos must"):
        wordnet_words(("nouns",), path=tmp_path)


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="wordnet-base not installed")
def test_wordnet_reader_on_the_real_wordnet():
    from oodscope.vlm.wordnet import wordnet_words

    words = wordnet_words(("noun", "adj"), path="/usr/share/wordnet")
    assert 100_000 < len(words) < 160_000  # WordNet 3.0: ~117k noun + ~21k adjective lemmas
    s = set(words)
    assert {"dog", "cat", "entity", "hot dog", "red"} <= s
    assert not any("_" in w or w.endswith(")") for w in words)
    assert len(s) == len(words)


def test_word_list_files(tmp_path):
    from oodscope.vlm.wordnet import load_word_list

    p = tmp_path / "w.txt"
    p.write_text("# negatives\napple\n\nbanana\napple\n  cherry  \n")
    assert load_word_list(p) == ["apple", "banana", "cherry"]
    assert load_word_list(["x", "y", "x"]) == ["x", "y"]
    with pytest.raises(ValueError, match="does not exist"):
        load_word_list(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no words"):
        load_word_list(tmp_path / "e.txt")


# ------------------------------------------------------------------------------ benchmarks
def _make_folders(root: Path) -> tuple[Path, dict[str, Path]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    id_dir = root / "id"
    for c, colour in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        d = id_dir / ["red_thing", "green_thing", "blue_thing"][c]
        d.mkdir(parents=True)
        for i in range(10):
            im = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(d / f"{i}.png")
    ood_dir = root / "noise"
    ood_dir.mkdir()
    for i in range(8):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(ood_dir / f"{i}.png")
    return id_dir, {"noise": ood_dir}


def test_vlm_imagefolder_benchmark_runs(tiny, tmp_path):
    from oodscope.bench import ProviderOptions, get_benchmark
    from oodscope.bench.runner import run_benchmark
    from oodscope.bench.clip import build_imagefolder_clip

    id_dir, ood_dirs = _make_folders(tmp_path)
    fs = build_imagefolder_clip(get_benchmark("vlm-imagefolder").with_params(id_dir=id_dir, ood_dirs=ood_dirs),
                                ProviderOptions(vlm=tiny["enc"], cache_dir=tmp_path / "cache", progress=False))
    assert fs.info["class_names"] == ["blue thing", "green thing", "red thing"]
    assert len(fs.train) + len(fs.val_id) + len(fs.test_id) == 30
    assert {"image_embeds", "local_embeds"} <= fs.fields()
    assert fs.detector_kwargs["*"]["encoder"] is tiny["enc"]
    assert 0.0 <= fs.info["id_accuracy"] <= 1.0
    words = ["apple", "house", "stone", "cloud", "river", "chair"]
    dets = ["mcm", "glmcm", ood.create("neglabel", words=words, n_negatives=3, n_groups=1),
            ood.create("adaneg", words=words, n_negatives=3, n_groups=1), "cooked"]
    res = run_benchmark(fs, dets, tune_params=False, ci=False, progress=False)
    ok = {r["detector"] for r in res.rows if r.get("status", "ok") in ("ok", None, "") and r.get("auroc") is not None}
    assert {"mcm", "glmcm", "neglabel", "adaneg"} <= ok, res.rows
    assert "cooked" in res.skipped and "logits" in res.skipped["cooked"]
    # the same benchmark from the command line
    from oodscope.cli import main

    out = tmp_path / "cli"
    rc = main(["bench", "vlm-imagefolder", "--vlm", f"hf:{tiny['dir']}", "--id", str(id_dir),
               "--ood", str(ood_dirs["noise"]), "--detectors", "mcm", "--no-tune", "--n-boot", "0",
               "--no-report", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0 and "noise" in (out / "results.csv").read_text()


def test_vlm_benchmarks_are_registered_and_need_a_vlm():
    from oodscope.bench import ProviderOptions, get_benchmark, list_benchmarks

    names = list_benchmarks()
    for n in ("vlm-imagefolder", "fashion-mnist-vlm", "imagenet-vlm", "imagenet200-vlm"):
        assert n in names
    spec = get_benchmark("imagenet-vlm")
    with pytest.raises(ValueError, match="--vlm"):
        spec.builder()(spec, ProviderOptions())


@pytest.mark.requires_data("fashion-mnist")
def test_cli_bench_with_vlm(tiny, tmp_path):
    from oodscope.cli import main

    out = tmp_path / "run"
    rc = main(["bench", "fashion-mnist-vlm", "--vlm", f"hf:{tiny['dir']}", "--subset", "40",
               "--detectors", "mcm,glmcm", "--no-tune", "--n-boot", "0", "--no-report",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    csv = (out / "results.csv").read_text()
    assert "mcm" in csv and "glmcm" in csv and "gaussian-noise" in csv


def test_openood_vlm_provider_on_a_miniature_layout(tiny, tmp_path):
    """The OpenOOD v1.5 image-list layout, in miniature (3 of imagenet200's classes used)."""
    from itertools import product

    from PIL import Image

    from oodscope.bench import ProviderOptions, get_benchmark
    from oodscope.bench.clip import build_openood_clip

    def openood_vlm(name, train_per_class=16, **options):
        spec = get_benchmark(f"{name}-vlm").with_params(train_per_class=train_per_class)
        return build_openood_clip(spec, ProviderOptions(**options))

    root = tmp_path / "openood"
    imgs = root / "images_largescale"
    lists = root / "benchmark_imglist"
    (lists / "imagenet200").mkdir(parents=True)
    (lists / "imagenet").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write_list(rel_list, folder, n, labelled):
        (imgs / folder).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(imgs / folder / f"{i}.png")
            lines.append(f"{folder}/{i}.png" + (f" {i % 3}" if labelled else ""))
        (lists / rel_list).write_text("\n".join(lines) + "\n")

    write_list("imagenet200/train_imagenet200.txt", "train", 9, True)
    write_list("imagenet200/val_imagenet200.txt", "val", 6, True)
    write_list("imagenet200/test_imagenet200.txt", "test", 6, True)
    write_list("imagenet200/val_openimage_o.txt", "oi_val", 4, False)
    write_list("imagenet/test_ninco.txt", "ninco", 5, False)
    names = ["".join(p) for p in product("abcdefghijklmno", repeat=2)][:200]
    fs = openood_vlm("imagenet200", vlm=tiny["enc"], class_names=names, data_root=root,
                     ood=["ninco"], fields={"image_embeds", "labels"}, train_per_class=2,
                     cache_dir=tmp_path / "cache", progress=False)
    assert len(fs.train) == 6 and len(fs.val_id) == 6 and len(fs.test_id) == 6
    assert list(fs.near_ood) == ["ninco"] and not fs.far_ood and len(fs.near_ood["ninco"]) == 5
    assert "local_embeds" not in fs.test_id.extras  # GL-MCM not requested: no patch tokens
    assert np.all(fs.val_ood.labels == -1)
    assert fs.detector_kwargs["*"]["class_names"] == names
    with pytest.raises(ValueError, match="class names"):
        openood_vlm("imagenet200", vlm=tiny["enc"], class_names=names[:10], data_root=root, ood=["ninco"])
    with pytest.raises(FileNotFoundError, match="test_textures"):
        openood_vlm("imagenet200", vlm=tiny["enc"], class_names=names, data_root=root)
