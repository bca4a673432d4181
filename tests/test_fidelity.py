"""curator's numbers against an independent CheXzero computation (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curator.constants import CHEXPERT_FINDINGS
from curator.model import CheckpointError, load_checkpoint, read_state_dict
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.preprocess import model_input
from curator.readers import read_image
from curator.workspace import Workspace
from tests import reference as ref
from tests.checkpoints import TINY, VIT_B_32, make_checkpoint, make_state_dict
from tests.conftest import write_raster_archive


@pytest.fixture(scope="module")
def varied_images(tmp_path_factory):
    """PNG/JPEG inputs of several sizes, aspect ratios and modes."""
    d = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(7)
    paths = []

    def grad(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        return (xx * 255 / max(w - 1, 1) * 0.6 + yy * 255 / max(h - 1, 1) * 0.4 + rng.normal(0, 12, (h, w)))

    for name, (h, w) in {"landscape": (300, 517), "portrait": (640, 401), "square": (320, 320), "small": (37, 90), "large": (1100, 905)}.items():
        arr = np.clip(grad(h, w), 0, 255).astype(np.uint8)
        p = d / f"{name}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
        q = d / f"{name}.jpg"
        Image.fromarray(arr).save(q, quality=92)
        paths.append(q)
    # a colour JPEG (channels differ), a 16-bit PNG, an RGB PNG with equal channels, a palette PNG
    col = np.clip(np.stack([grad(250, 333), grad(250, 333) * 0.5, 255 - grad(250, 333)], -1), 0, 255).astype(np.uint8)
    Image.fromarray(col).save(d / "colour.jpg", quality=95)
    Image.fromarray(col).save(d / "colour.png")
    paths += [d / "colour.jpg", d / "colour.png"]
    a16 = np.clip(grad(210, 290) * 257, 0, 65535).astype(np.uint16)
    Image.fromarray(a16).save(d / "deep16.png")
    paths.append(d / "deep16.png")
    Image.fromarray(np.clip(grad(120, 160), 0, 255).astype(np.uint8)).convert("P").save(d / "palette.png")
    paths.append(d / "palette.png")
    return paths


def test_sixteen_bit_fixture_is_really_16_bit(varied_images):
    with Image.open([p for p in varied_images if p.name == "deep16.png"][0]) as im:
        assert im.mode.startswith("I")


def test_model_input_equals_reference_transform(varied_images):
    for p in varied_images:
        ours = model_input(read_image(p).image)
        theirs = ref.reference_input(p)
        assert ours.shape == (3, 224, 224)
        assert torch.equal(ours, theirs), f"{p.name}: max diff {(ours - theirs).abs().max()}"


def test_exif_orientation_is_applied_as_cv2_applies_it(tmp_path):
    """A JPEG or PNG whose EXIF says "rotate" is read turned, as cv2.imread (CheXzero's reader)
    turns it, for all seven non-trivial orientations; --gpu-jpeg leaves such files to the exact path."""
    from curator import device_jpeg

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:180, 0:260]
    grey = np.clip(xx * 0.7 + yy * 0.3 + 80 * (xx < 60) + rng.normal(0, 8, xx.shape), 0, 255).astype(np.uint8)
    colour = np.stack([grey, 255 - grey, np.roll(grey, 40, axis=1)], -1)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for name, arr in (("g", grey), ("c", colour)):
            for ext in ("jpg", "png"):
                f = tmp_path / f"{name}{orientation}.{ext}"
                Image.fromarray(arr).save(f, exif=exif, **({"quality": 90} if ext == "jpg" else {}))
                ours, theirs = model_input(read_image(f).image), ref.reference_input(f)
                assert torch.equal(ours, theirs), f"{f.name}: max diff {(ours - theirs).abs().max()}"
                if orientation > 1:  # (the test would not tell otherwise: the turned input differs)
                    exif1 = Image.Exif()
                    exif1[0x0112] = 1
                    plain = tmp_path / f"plain.{ext}"
                    Image.fromarray(arr).save(plain, exif=exif1, **({"quality": 90} if ext == "jpg" else {}))
                    assert not torch.equal(ours, model_input(read_image(plain).image)), f.name
        data = (tmp_path / f"g{orientation}.jpg").read_bytes()
        assert (device_jpeg.deferrable(data) is None) == (orientation != 1)


def test_antialias_matters_so_the_test_can_tell():
    # torchvision's default (antialias=True) differs from the published model's transform.
    import torchvision.transforms.functional as TF

    x = torch.rand(3, 320, 320) * 255
    a = TF.resize(x, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    b = TF.resize(x, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
    assert (a - b).abs().max() > 1.0


def test_text_and_image_embeddings_match(tiny_checkpoints, varied_images):
    ck = load_checkpoint(tiny_checkpoints[0], "cpu")
    model = ref.reference_model(torch.load(tiny_checkpoints[0], weights_only=True), TINY)
    texts = ["pleural effusion", "no pleural effusion", "Small LEFT apical pneumothorax", "free air under the diaphragm"]
    np.testing.assert_allclose(ck.encode_texts(texts).numpy(), ref.text_features(model, texts), atol=1e-5)
    # curator runs the causal text transformer only up to the longest prompt's end-of-text token;
    # a prompt that fills the 77-token context (truncated) and mixed lengths must not change a thing
    long = ["very " * 120 + "enlarged heart", "edema", "no acute cardiopulmonary process on this portable film"]
    np.testing.assert_allclose(ck.encode_texts(long).numpy(), ref.text_features(model, long), atol=1e-5)
    np.testing.assert_allclose(ck.encode_texts(long[1:]).numpy(), ref.text_features(model, long[1:]), atol=1e-5)
    batch = torch.stack([ref.reference_input(p) for p in varied_images[:4]])
    np.testing.assert_allclose(ck.encode_images(batch).numpy(), ref.image_features(model, batch), atol=1e-5)


def _reference_probs(ckpt_paths, image_paths, dims=TINY):
    findings = [[f] for f in CHEXPERT_FINDINGS]
    batch = torch.stack([ref.reference_input(p) for p in image_paths])
    members, feats = [], []
    for cp in ckpt_paths:
        model = ref.reference_model(torch.load(cp, weights_only=True), dims)
        img = ref.image_features(model, batch)
        feats.append(img)
        members.append(ref.softmax_probs(img, ref.class_weights(model, findings, "{}"), ref.class_weights(model, findings, "no {}")))
    return members, np.mean(members, axis=0), feats


def _stored(ws_root, image_paths):
    ws = Workspace(ws_root)
    cat = ws.read_table("catalog").to_pandas().set_index("path")
    ids = [int(cat.loc[str(p.resolve()), "image_id"]) for p in image_paths]
    preds = ws.read_table("predictions").to_pandas()
    emb = ws.read_table("embeddings").to_pandas()
    return ids, preds, emb


@pytest.mark.parametrize("n_ckpt", [1, 3])
def test_embed_probabilities_match_reference(tmp_path, tiny_checkpoints, n_ckpt):
    paths = write_raster_archive(tmp_path / "arc", 7, seed=n_ckpt)
    cks = tiny_checkpoints[:n_ckpt]
    run_embed(EmbedConfig(archives=[str(tmp_path / "arc")], workspace=str(tmp_path / "ws"), checkpoints=[str(c) for c in cks], device="cpu", workers=0, batch_size=3, progress=False))
    members, ens, feats = _reference_probs(cks, paths)
    ids, preds, emb = _stored(tmp_path / "ws", paths)
    cols = [f.lower().replace(" ", "_") for f in CHEXPERT_FINDINGS]
    from curator.model import file_sha256

    for k, cp in enumerate(cks):
        sha = file_sha256(cp)
        sub = preds[preds.member == sha].set_index("image_id").loc[ids, cols].to_numpy()
        np.testing.assert_allclose(sub, members[k], atol=1e-5)
        e = emb[emb.checkpoint == sha].set_index("image_id").loc[ids, "embedding"]
        np.testing.assert_allclose(np.stack(e.to_numpy()), feats[k], atol=1e-5)
    sub = preds[preds.member == "ensemble"].set_index("image_id").loc[ids, cols].to_numpy()
    np.testing.assert_allclose(sub, ens, atol=1e-5)
    # the probabilities are not degenerate: they differ between images and findings
    assert sub.std(axis=0).max() > 1e-4 and sub.std(axis=1).max() > 1e-3


def test_mixed_fp16_checkpoint_loads_exactly(tmp_path):
    sd = make_state_dict(11, TINY, mixed_fp16=True)
    assert any(v.dtype == torch.float16 for v in sd.values()) and any(v.dtype == torch.float32 for v in sd.values())
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    ck = load_checkpoint(path, "cpu")
    for k, v in ck.model.state_dict().items():
        if k in sd:
            assert v.dtype == torch.float32
            assert torch.equal(v, sd[k].float()), k


def test_fp32_weights_are_not_rounded_to_fp16(tiny_checkpoints):
    sd = torch.load(tiny_checkpoints[1], weights_only=True)
    ck = load_checkpoint(tiny_checkpoints[1], "cpu")
    w = ck.model.state_dict()["visual.proj"]
    assert torch.equal(w, sd["visual.proj"])
    assert not torch.equal(w, sd["visual.proj"].half().float())


def test_the_model_runs_in_float32_on_cuda_unless_amp_is_asked(tiny_checkpoints, caplog):
    """CheXzero-exact by default on a GPU as well: no fp16 autocast and no TF32 (cuDNN's default
    for convolutions) unless --amp asks for it. (Without a GPU here, the choice itself is checked:
    the context each encode runs in, and the flags it leaves.)"""
    import contextlib
    import warnings

    from curator.model import Checkpoint, load_checkpoints

    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        exact = Checkpoint(path="x", sha256="y", model=None, device=torch.device("cuda"))
        assert not exact.amp and isinstance(exact._autocast(), contextlib.nullcontext)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch: "CUDA is not available ... Disabling autocast")
            fast = Checkpoint(path="x", sha256="y", model=None, device=torch.device("cuda"), amp=True)._autocast()
        assert isinstance(fast, torch.autocast) and fast.fast_dtype == torch.float16
        # a replica (one per GPU) runs as its original does
        assert Checkpoint(path="x", sha256="y", model=torch.nn.Linear(1, 1), device=torch.device("cpu"), amp=True).replicate("cpu").amp
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was
    # on the CPU --amp changes nothing, and says so
    x = torch.randn(2, 3, 224, 224)
    with caplog.at_level("WARNING"):
        a, = load_checkpoints(tiny_checkpoints[:1], "cpu", amp=True)
    assert any("CUDA only" in r.getMessage() for r in caplog.records)
    b = load_checkpoint(tiny_checkpoints[0], "cpu")
    assert isinstance(a._autocast(), contextlib.nullcontext) and torch.equal(a.encode_images(x), b.encode_images(x))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"this is not a checkpoint", "not readable by torch.load"),
        ("dict_without_keys", "missing visual.conv1.weight"),
        ("list", "not a state_dict"),
    ],
)
def test_bad_checkpoint_gets_one_line_error(tmp_path, content, needle):
    p = tmp_path / "bad.pt"
    if content == "dict_without_keys":
        torch.save({"foo": torch.zeros(2)}, p)
    elif content == "list":
        torch.save([torch.zeros(2)], p)
    else:
        p.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(p)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg and needle in msg and "expected a CheXzero checkpoint" in msg


def test_wrong_shaped_state_dict_is_reported(tmp_path):
    sd = make_state_dict(3, TINY)
    sd["visual.proj"] = torch.zeros(5, 7)
    p = tmp_path / "shape.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p, "cpu")
    assert str(p) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_vit_b32_sized_checkpoint_matches_reference(tmp_path, varied_images):
    cp = make_checkpoint(tmp_path / "vitb32.pt", seed=5, dims=VIT_B_32)
    ck = load_checkpoint(cp, "cpu")
    assert ck.embed_dim == 512 and ck.image_size == 224
    images = varied_images[:3]
    members, _, feats = _reference_probs([cp], images, dims=VIT_B_32)
    batch = torch.stack([model_input(read_image(p).image) for p in images])
    img = ck.encode_images(batch).numpy()
    np.testing.assert_allclose(img, feats[0], atol=1e-5)
    from curator import zeroshot
    from curator.prompts import default_prompt_set

    pos, neg = zeroshot.prompt_weights(ck.encode_texts, default_prompt_set())
    np.testing.assert_allclose(zeroshot.softmax_probabilities(img, pos, neg), members[0], atol=1e-5)
    assert np.ptp(members[0]) > 1e-3
