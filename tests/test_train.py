"""curator.train: contrastive training on a small PNG archive made here, checkpoints, resume, init."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from curator import train as T
from curator.model import load_checkpoint, new_clip, read_state_dict
from curator.preprocess import model_input
from curator.readers import read_image
from curator.reports import extract_impression
from tests.checkpoints import TINY, make_checkpoint

# Impression per class: 0 nothing, 1 left disc, 2 right disc, 3 both.
IMPRESSIONS = ("No mass.", "Large mass in the left lung.", "Large mass in the right lung.", "Large masses in both lungs.")
SIZES = ((256, 256), (240, 200), (200, 260))


def _phantom(cls: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 30 * (yy / h) + rng.normal(0, 6, (h, w))
    r = 0.17 * min(w, h)
    cy = h * rng.uniform(0.4, 0.6)
    for side, cx in ((1, w * 0.3), (2, w * 0.7)):
        if cls in (side, 3):
            cx += rng.uniform(-0.05, 0.05) * w
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 215
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def make_archive(root, studies: int = 40, seed: int = 0):
    """PNG archive: ground_truth.csv (path, study_key, mass, left_mass), reports.csv; one broken file,
    one image whose study has no report."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows, reports = [], []
    for s in range(studies):
        key = f"S{s:04d}"
        cls = s % 4
        for k in range(2 if s % 5 == 0 else 1):
            rel = f"img/{key}_{k}.png"
            _phantom(cls, SIZES[(s + k) % 3], rng).save(root / rel)
            rows.append({"path": rel, "study_key": key, "mass": int(cls > 0), "left_mass": int(cls in (1, 3))})
        reports.append({"study_key": key, "report": f"EXAMINATION: CHEST PA\nFINDINGS: See impression.\n\nIMPRESSION:\n{IMPRESSIONS[cls]}\n"})
    (root / "img/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    rows.append({"path": "img/broken.png", "study_key": "S0001", "mass": 1, "left_mass": 1})
    _phantom(1, (256, 256), rng).save(root / "img/orphan.png")
    rows.append({"path": "img/orphan.png", "study_key": "NOREPORT", "mass": 1, "left_mass": 1})
    pd.DataFrame(rows).to_csv(root / "ground_truth.csv", index=False)
    pd.DataFrame(reports).to_csv(root / "reports.csv", index=False)
    return root / "ground_truth.csv", root / "reports.csv"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("archive"))


def tiny_cfg(archive, out, **kw) -> T.TrainConfig:
    gt, rep = archive
    base = dict(images=str(gt), reports=str(rep), out=str(out), arch="tiny", steps=8, batch_size=8, lr=1e-3,
                warmup=2, threads=1, log_every=2, save_every=0, progress=False)
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ck.pt"
    cfg = tiny_cfg(archive, out, steps=40, batch_size=16, lr=2e-3, warmup=4, threads=1, log_every=5,
                   val_truth=str(archive[0]), val_fraction=0.25)
    trainer = T.Trainer(cfg)
    summary = trainer.run()
    return trainer, summary


# --------------------------------------------------------------------------------------------


def test_loss_falls_and_validation(trained):
    trainer, summary = trained
    losses = summary["losses"]
    assert len(losses) == 40 and summary["step"] == 40 and summary["finished"]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first - last > 0.3, (first, last)
    data = summary["data"]
    assert data["images_unreadable"] == 1 and data["images_without_report"] == 1
    # Held-out studies are not trained on; the validation AUCs cover both truth columns.
    train_paths = {r.path for r in trainer.train_refs}
    assert train_paths.isdisjoint(trainer.val.paths) and len(trainer.val.paths) >= 4
    assert set(summary["val_auc"]) == {"mass", "left_mass"}
    assert all(0.0 <= v <= 1.0 for v in summary["val_auc"].values())
    # The JSON record next to the checkpoint.
    rec = json.loads((trainer.out.parent / "ck.pt.json").read_text())
    assert rec["step"] == 40 and rec["final_loss"] == pytest.approx(np.mean(losses[-5:]))
    assert rec["val_auc"] == summary["val_auc"] and rec["command"].startswith("curator train --images ")


def test_batches_are_the_curator_transform(trained):
    trainer, _ = trained
    rows = trainer.train_rows[:3]
    got = trainer.images_for_rows(rows)
    want = torch.stack([model_input(read_image(trainer.train_refs[i].path).image) for i in range(3)])
    assert torch.equal(got, want)


def test_checkpoint_reloads_with_identical_outputs(trained):
    trainer, _ = trained
    sd = torch.load(trainer.out, map_location="cpu", weights_only=True)
    # Plain state dict: exactly the model's keys, all fp32 floats, nothing else.
    assert set(sd) == set(new_clip(**TINY).state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values())
    ck = load_checkpoint(trainer.out, device="cpu")
    x = torch.stack([model_input(read_image(r.path).image) for r in trainer.train_refs[:4]])
    texts = ["large mass", "no mass", "Large mass in the left lung."]
    model = trainer.model.eval()
    with torch.inference_mode():
        img = F.normalize(model.encode_image(x), dim=-1)
        from open_clip.tokenizer import tokenize

        from curator.model import encode_text_to_eot

        # the same computation as curator's text path (up to the end-of-text token): bit-identical
        txt = F.normalize(encode_text_to_eot(model, tokenize(texts)), dim=-1)
        full = F.normalize(model.encode_text(tokenize(texts)), dim=-1)  # open_clip's full context
    assert torch.equal(ck.encode_images(x), img)
    assert torch.equal(ck.encode_texts(texts), txt)
    torch.testing.assert_close(ck.encode_texts(texts), full, atol=1e-6, rtol=0)
    assert torch.equal(ck.model.logit_scale, model.logit_scale.detach())
    assert float(model.logit_scale.detach()) <= math.log(100) + 1e-6


def test_resume_matches_uninterrupted_run(archive, tmp_path, caplog):
    a = tmp_path / "a.pt"
    T.train(tiny_cfg(archive, a))
    b = tmp_path / "b.pt"
    half = T.train(tiny_cfg(archive, b, stop_at=4))
    assert half["step"] == 4 and not half["finished"]
    assert json.loads((tmp_path / "b.pt.json").read_text())["finished"] is False
    # A second start without --resume must not silently overwrite the saved run.
    with pytest.raises(T.TrainError, match="--resume"):
        T.Trainer(tiny_cfg(archive, b))
    # Nor may a resume change what is trained.
    with pytest.raises(T.TrainError, match="lr"):
        T.Trainer(tiny_cfg(archive, b, lr=5e-4, resume=True))
    # Resume through the command line with nothing but --out: the saved config is used.
    parser = argparse.ArgumentParser()
    T.add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", str(b), "--resume", "--no-progress"])
    with caplog.at_level(logging.INFO, logger="curator.train"):
        assert args.func(args) == 0
    assert "decoded 1 file(s)" in caplog.text and "48 reused from cache" in caplog.text and "resumed" in caplog.text
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    st_a = torch.load(str(a) + ".train-state", weights_only=True)
    st_b = torch.load(str(b) + ".train-state", weights_only=True)
    assert st_b["step"] == 8 and torch.equal(st_a["losses"], st_b["losses"])


def test_finetune_starts_from_init(archive, tmp_path):
    init = make_checkpoint(tmp_path / "init.pt", seed=3)
    ck = load_checkpoint(init, device="cpu")
    # steps=0 writes the init weights back unchanged.
    T.train(tiny_cfg(archive, tmp_path / "zero.pt", init=str(init), steps=0))
    s0, si = read_state_dict(tmp_path / "zero.pt"), read_state_dict(init)
    assert all(torch.equal(s0[k], si[k].float()) for k in si)
    # Step 0's loss is the init model's loss on step 0's batch, computed independently.
    trainer = T.Trainer(tiny_cfg(archive, tmp_path / "one.pt", init=str(init), steps=1))
    idx = trainer.batch_indices(0)
    refs = [trainer.train_refs[i] for i in idx]
    reports = pd.read_csv(archive[1], dtype=str).set_index("study_key")["report"]
    texts = [extract_impression(reports[r.study_key]) for r in refs]
    x = torch.stack([model_input(read_image(r.path).image) for r in refs])
    img, txt = ck.encode_images(x), ck.encode_texts(texts)
    logits = ck.model.logit_scale.detach().exp() * img @ txt.t()
    labels = torch.arange(len(refs))
    want = float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2)
    summary = trainer.run()
    assert summary["losses"][0] == pytest.approx(want, rel=1e-5)
    assert trainer.cfg.lr == 1e-3 and trainer.dims == TINY


def test_cli_record_reproduces_the_run(archive, tmp_path, monkeypatch):
    gt, rep = archive
    out = tmp_path / "c.pt"
    argv = ["train", "--images", str(gt), "--reports", str(rep), "--out", str(out), "--arch", "tiny",
            "--steps", "3", "--batch-size", "8", "--seed", "5", "--threads", "1", "--augment",
            "--same-text-positives", "--no-progress", "--save-every", "2"]
    assert T.main(argv) == 0
    rec = json.loads((tmp_path / "c.pt.json").read_text())
    assert rec["config"]["augment"] and rec["config"]["lr"] == T.DEFAULT_LR_SCRATCH and rec["step"] == 3
    cmd = shlex.split(rec["command"])
    assert cmd[:2] == ["curator", "train"]
    cmd[cmd.index("--out") + 1] = str(tmp_path / "d.pt")
    assert T.main(cmd[1:] + ["--no-progress"]) == 0
    sc, sd = read_state_dict(out), read_state_dict(tmp_path / "d.pt")
    assert all(torch.equal(sc[k], sd[k]) for k in sc)
    # Errors are one line and exit code 2.
    assert T.main(["train", "--images", str(tmp_path / "nope"), "--reports", str(rep), "--out", str(tmp_path / "e.pt")]) == 2


def test_folder_keys_from_dicom_uid_and_names(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    (tmp_path / "p1" / "s50414267").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "p1" / "s50414267" / "view1.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "s777.png")
    Image.new("L", (8, 8)).save(tmp_path / "unpaired.png")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    keys = {"s50414267", "s777", "1.2.3.4"}
    want = [("p1/s50414267/view1.jpg", "s50414267"), ("s777.png", "s777"), ("x.dcm", "1.2.3.4")]
    refs = T.find_images(tmp_path, keys)
    assert sorted((r.shown, r.study_key) for r in refs) == want
    # A CSV of paths without a study_key column pairs the same way.
    listed = [w[0] for w in want] + ["unpaired.png"]
    pd.DataFrame({"path": listed}).to_csv(tmp_path / "list.csv", index=False)
    refs = T.find_images(tmp_path / "list.csv", keys)
    assert sorted((r.shown, r.study_key) for r in refs) == want


@pytest.mark.parametrize(
    "report, expected",
    [
        ("FINAL REPORT\nEXAMINATION:  CHEST (PA AND LAT)\n\nFINDINGS: The lungs are clear.\n\nIMPRESSION: No acute cardiopulmonary process.\n",
         "No acute cardiopulmonary process."),
        ("IMPRESSION:\n1. Moderate left pleural effusion.\n2. No pneumothorax.\n\nRECOMMENDATION(S):  Follow-up CT.",
         "1. Moderate left pleural effusion. 2. No pneumothorax."),
        ("INDICATION: cough. IMPRESSION: Small right effusion. NOTIFICATION: called to Dr. X.", "Small right effusion."),
        ("IMPRESSION: Right PICC: tip in the SVC. No pneumothorax.", "Right PICC: tip in the SVC. No pneumothorax."),
        ("Impression: Mild pulmonary edema.\nRecommendation: diuresis.", "Mild pulmonary edema."),
        ("FINDINGS:\nHeart size is normal.   Lungs are clear.\nCOMPARISON: None.", "Heart size is normal. Lungs are clear."),
        ("IMPRESSION:\n\nFINDINGS: Clear lungs.", "Clear lungs."),
        ("Heart size normal.\n  Lungs clear.", "Heart size normal. Lungs clear."),
        ("", ""),
    ],
)
def test_extract_impression(report, expected):
    assert extract_impression(report) == expected


def test_loss_and_schedule():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(math.log(10.0))
    plain = T.clip_loss(img, txt, scale)
    # Distinct texts: the same-text variant is the plain loss.
    assert torch.allclose(T.clip_loss(img, txt, scale, torch.arange(6)), plain)
    logits = 10 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    want = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert torch.allclose(plain, want)
    lrs = [T.lr_at(s, 1.0, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] < 0.01
    assert T.finding_text("pleural_effusion") == "pleural effusion"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Moderate cardiomegaly. No pleural effusion or pneumothorax.", ["Moderate cardiomegaly.", "No pleural effusion or pneumothorax."]),
        ("1. Nodule measuring 1.5 cm in the RUL. 2) No effusion. 3. ETT 4 cm above the carina.",
         ["Nodule measuring 1.5 cm in the RUL.", "No effusion.", "ETT 4 cm above the carina."]),
        ("Is there edema? No.  Heart   size normal!", ["Is there edema?", "No.", "Heart size normal!"]),
        ("No acute process", ["No acute process"]),
        # a sentence that starts with a decimal is not list item 2 of "5 cm mass."
        ("No effusion. 2.5 cm mass in the left upper lobe. 1.5 cm nodule.",
         ["No effusion.", "2.5 cm mass in the left upper lobe.", "1.5 cm nodule."]),
        ("1.Small effusion. 12) No pneumothorax.", ["1.Small effusion.", "No pneumothorax."]),
    ],
)
def test_split_sentences(text, expected):
    from curator.reports import split_sentences

    assert split_sentences(text) == expected


def test_sentence_sampling(archive, tmp_path):
    from open_clip.tokenizer import tokenize

    # Reports with two or three sentences per impression.
    gt, rep = archive
    reports = pd.read_csv(rep, dtype=str)
    extra = ["No effusion.", "Heart size is normal. No pneumothorax.", "2. Lines and tubes unchanged.", ""]
    reports["report"] = [r.rstrip() + " " + extra[i % 4] + "\n" for i, r in enumerate(reports["report"])]
    rep2 = tmp_path / "reports.csv"
    reports.to_csv(rep2, index=False)
    trainer = T.Trainer(tiny_cfg((gt, rep2), tmp_path / "s.pt", sentence_sampling=True, same_text_positives=True, steps=6))
    impression = {k: extract_impression(r) for k, r in zip(reports["study_key"], reports["report"])}
    counts: dict[tuple[int, int], int] = {}
    for step in range(40):
        idx = trainer.batch_indices(step)
        rows = trainer.train_text[idx].tolist()
        texts = trainer.batch_texts(rows, step)
        assert texts == trainer.batch_texts(rows, step)  # a pure function of (seed, step, rows)
        for i, t in zip(idx, texts):
            full = impression[trainer.train_refs[i].study_key]
            # Sentences of the full impression, split independently of curator.reports.
            want = [s.strip() for s in full.replace("2. Lines", "Lines").split(". ")]
            want = [s if s.endswith(".") else s + "." for s in want]
            got = [s if s.endswith(".") else s + "." for s in t.split(". ")]
            assert got and all(g in want for g in got) and got == sorted(got, key=want.index), (t, full)
            counts[(len(want), len(got))] = counts.get((len(want), len(got)), 0) + 1
        tokens, ids = trainer.sampled_texts(rows, step)
        assert torch.equal(tokens, tokenize(texts, context_length=trainer.context_length))
        same = np.equal.outer(np.array(texts, dtype=object), np.array(texts, dtype=object))
        assert np.array_equal(same, (ids[:, None] == ids[None, :]).numpy())
    # Two-sentence impressions: both sentences kept with probability 1/4 (each kept with 1/2; an
    # empty draw becomes one sentence), one sentence 3/4.
    two = {k[1]: v for k, v in counts.items() if k[0] == 2}
    n2 = sum(two.values())
    assert n2 > 100 and abs(two[2] / n2 - 1 / 4) < 0.1 and abs(two[1] / n2 - 3 / 4) < 0.1
    assert trainer.batch_texts(rows, 0) != trainer.batch_texts(rows, 1)
    summary = trainer.run()
    assert summary["finished"] and all(math.isfinite(v) for v in summary["losses"])
    assert "--sentence-sampling" in json.loads((tmp_path / "s.pt.json").read_text())["command"]


def test_query_style_drops_full_stops(archive, tmp_path):
    gt, rep = archive
    reports = pd.read_csv(rep, dtype=str)
    # Impressions with a decimal ("2.5 cm") and, every other one, list numbering.
    reports["report"] = [
        (r.rstrip() + " Heart size is normal. 2.5 cm mass in the left upper lobe.\n") if i % 2
        else r.replace("IMPRESSION:\n", "IMPRESSION:\n1. ").rstrip() + " 2. No pneumothorax.\n"
        for i, r in enumerate(reports["report"])
    ]
    rep2 = tmp_path / "reports.csv"
    reports.to_csv(rep2, index=False)
    impression = {k: extract_impression(r) for k, r in zip(reports["study_key"], reports["report"])}

    # Whole impressions (no sentence sampling), every text in query style: no sentence keeps its
    # full stop, the decimal and the words are kept, the list numbering goes.
    always = T.Trainer(tiny_cfg((gt, rep2), tmp_path / "q1.pt", query_style=1.0))
    seen = set()
    for step in range(5):
        idx = always.batch_indices(step)
        texts = always.batch_texts(always.train_text[idx].tolist(), step)
        for i, t in zip(idx, texts):
            full = impression[always.train_refs[i].study_key]
            want = re.sub(r"\.(\s|$)", r"\1", re.sub(r"(^|(?<=\. ))\d\. ", "", full)).strip()
            assert t == want, (t, full)
            assert ("2.5 cm mass in the left upper lobe" in t) != ("No pneumothorax" in t), t
            seen.add("2.5 cm" in t)
    assert seen == {True, False}

    # With sentence sampling, query style changes only the full stops: the sentences drawn are
    # those of the same run without it, and about half the texts lose their stops.
    cfg = dict(sentence_sampling=True, same_text_positives=True, steps=4)
    plain = T.Trainer(tiny_cfg((gt, rep2), tmp_path / "p.pt", **cfg))
    half = T.Trainer(tiny_cfg((gt, rep2), tmp_path / "q.pt", query_style=0.5, **cfg))
    n = dropped = 0
    for step in range(40):
        rows = plain.train_text[plain.batch_indices(step)].tolist()
        a, b = plain.batch_texts(rows, step), half.batch_texts(rows, step)
        for x, y in zip(a, b):
            assert x.endswith(".") and y.replace(".", "") == x.replace(".", "")
            n += 1
            dropped += not y.endswith(".")
    assert n > 200 and abs(dropped / n - 0.5) < 0.1
    # A text and its copy without full stops are one text for the loss (positives of each other).
    from open_clip.tokenizer import tokenize

    mixed = 0
    for step in range(10):
        rows = half.train_text[half.batch_indices(step)].tolist()
        texts = half.batch_texts(rows, step)
        tokens, ids = half.sampled_texts(rows, step)
        assert torch.equal(tokens, tokenize(texts, context_length=half.context_length))
        bare = np.array([re.sub(r"\.(\s|$)", r"\1", t) for t in texts], dtype=object)
        assert np.array_equal(np.equal.outer(bare, bare), (ids[:, None] == ids[None, :]).numpy())
        mixed += sum(1 for i in range(len(texts)) for j in range(len(texts)) if bare[i] == bare[j] and texts[i] != texts[j])
    assert mixed > 0
    summary = half.run()
    assert summary["finished"] and all(math.isfinite(v) for v in summary["losses"])
    assert "--query-style 0.5" in json.loads((tmp_path / "q.pt.json").read_text())["command"]
    with pytest.raises(T.TrainError, match="query_style"):
        T.Trainer(tiny_cfg((gt, rep2), tmp_path / "bad.pt", query_style=1.5))


def test_init_demo_names_the_bundled_model(archive, tmp_path):
    """`--init demo` fine-tunes the bundled demo model, as `embed --checkpoint demo` embeds with it."""
    from curator.cli import build_parser
    from curator.demo_model import demo_checkpoint_path

    gt, rep = archive
    args = build_parser().parse_args(["train", "--images", str(gt), "--reports", str(rep), "--out", str(tmp_path / "f.pt"),
                                      "--init", "demo"])
    cfg = T.config_from_args(args, argv=["curator", "train"])
    assert cfg.init == str(demo_checkpoint_path()) and Path(cfg.init).is_file()
    args = build_parser().parse_args(["train", "--images", str(gt), "--reports", str(rep), "--out", str(tmp_path / "g.pt"),
                                      "--init", str(tmp_path / "mine.pt")])
    assert T.config_from_args(args, argv=["curator", "train"]).init == str(tmp_path / "mine.pt")
