"""Data discovery, manifest, bad files, subsetting and splits."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import data as D
from tests.gen_data import make_dataset

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "blood-cells"


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("gen"), train_per_class=6, test_per_class=2,
                        splits=("TRAIN", "TEST", "TEST_SIMPLE"))


def _copy_layout(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_flat_kaggle_layout(gen):
    dirs = D.find_split_dirs(gen)
    assert set(dirs) == {"TRAIN", "TEST", "TEST_SIMPLE"}
    m = D.build_manifest(gen)
    assert list(m.df.columns) == list(D.MANIFEST_COLUMNS)
    assert m.df.groupby("split").size().to_dict() == {"TEST": 8, "TEST_SIMPLE": 8, "TRAIN": 24}
    assert set(m.df["label"]) == {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert m.df["image_id"].is_unique
    assert (m.df["width"] == 64).all() and (m.df["height"] == 48).all()
    assert m.df["sha1"].str.len().eq(40).all()


def test_nested_kaggle_layout(gen, tmp_path):
    nested = tmp_path / "blood-cells" / "dataset2-master" / "dataset2-master" / "images"
    _copy_layout(gen, nested)
    (tmp_path / "blood-cells" / "dataset-master").mkdir()  # the originals folder sits beside it
    dirs = D.find_split_dirs(tmp_path / "blood-cells")
    assert dirs["TRAIN"] == nested / "TRAIN"
    assert dirs["TEST"] == nested / "TEST"
    assert len(D.build_manifest(tmp_path / "blood-cells").split("TRAIN")) == 24


def test_imagefolder_root_and_lowercase_plural_classes(tmp_path, gen):
    root = tmp_path / "folder"
    for c in ("EOSINOPHIL", "NEUTROPHIL"):
        _copy_layout(gen / "TRAIN" / c, root / (c.lower() + "s"))
    (root / "README.txt").parent.mkdir(exist_ok=True)
    (root / "README.txt").write_text("not a class")
    m = D.build_manifest(root)
    assert set(m.df["label"]) == {"eosinophil", "neutrophil"}
    assert (m.df["split"] == "TRAIN").all()


def test_test_dir_in_kaggle_layout_overrides(gen, tmp_path):
    other = _copy_layout(gen / "TEST", tmp_path / "elsewhere" / "dataset2-master" / "images" / "TEST")
    m = D.build_manifest(gen, test_dir=tmp_path / "elsewhere")
    assert m.split_dirs["TEST"] == str(other)
    # a TEST folder given directly works too
    assert D.build_manifest(gen, test_dir=other).split_dirs["TEST"] == str(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataNotFoundError, match="no class folders"):
        D.build_manifest(gen, test_dir=tmp_path / "empty")


def test_bad_files_are_skipped_and_listed(tmp_path, gen):
    root = _copy_layout(gen, tmp_path / "d")
    eos = root / "TRAIN" / "EOSINOPHIL"
    good = sorted(eos.glob("*.jpeg"))[0].read_bytes()
    (eos / "truncated.jpeg").write_bytes(good[: len(good) // 2])
    (eos / "notes.txt").write_text("hello")
    (eos / "fake.jpeg").write_text("not really a jpeg")
    (eos / "gone.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    m = D.build_manifest(root)
    skipped = {Path(s["path"]).name: s["error"] for s in m.skipped}
    assert set(skipped) == {"truncated.jpeg", "notes.txt", "fake.jpeg", "gone.jpeg"}
    assert skipped["gone.jpeg"] == "a broken symbolic link"
    assert "extension" in skipped["notes.txt"]
    assert skipped["fake.jpeg"] == "UnidentifiedImageError: cannot identify image file"  # no buffer address
    assert len(m.split("TRAIN")) == 24  # every good image is still there


def test_find_data_root_order_and_help(tmp_path, gen, monkeypatch):
    monkeypatch.setenv("WBC_DATA", str(gen))
    assert D.find_data_root() == gen
    assert D.find_data_root(gen / "TRAIN") == gen / "TRAIN"  # --data wins (an ImageFolder root)
    with pytest.raises(D.DataNotFoundError, match="wbc data fetch"):
        D.find_data_root(tmp_path / "empty")
    monkeypatch.setenv("WBC_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(D, "KNOWN_DATA_LOCATIONS", (tmp_path / "nope",))
    with pytest.raises(D.DataNotFoundError, match="Searched"):
        D.find_data_root()


def test_subset_per_class_is_seeded(gen):
    train = D.build_manifest(gen).split("TRAIN")
    a, b, c = (D.subset_per_class(train, 3, s) for s in (1, 1, 2))
    assert a.groupby("label").size().eq(3).all()
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["image_id"].tolist() != c["image_id"].tolist()
    assert len(D.subset_per_class(train, None, 0)) == len(train)


def test_random_and_grouped_split():
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(80)],
                       "label": np.repeat(["eosinophil", "neutrophil"], 40)})
    groups = np.array([f"{lab}-{i // 4}" for i, lab in enumerate(df["label"])])  # 10 groups of 4 per class
    tr, va = D.random_split(df, 0.2, 0)
    assert len(va) == 16 and not set(tr["image_id"]) & set(va["image_id"])
    tr, va = D.grouped_split(df, groups, 0.2, 0)
    gtr = {g for g, i in zip(groups, df["image_id"]) if i in set(tr["image_id"])}
    gva = {g for g, i in zip(groups, df["image_id"]) if i in set(va["image_id"])}
    assert not gtr & gva
    assert va.groupby("label").size().between(8, 12).all()
    tr2, va2 = D.grouped_split(df, groups, 0.2, 0)
    assert va2["image_id"].tolist() == va["image_id"].tolist()


@pytest.mark.skipif(not REAL.is_dir(), reason="real data not present")
def test_real_test_simple_counts():
    df, skipped = D.scan_class_folders(REAL / "TEST_SIMPLE", "TEST_SIMPLE")
    assert df.groupby("label").size().to_dict() == {"eosinophil": 13, "lymphocyte": 6, "monocyte": 4,
                                                    "neutrophil": 48}
    assert not skipped
    # the two byte-identical eosinophil pairs noted in SOURCE.md
    assert df["sha1"].nunique() == 69
