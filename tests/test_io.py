"""cxrlib.core.files: atomic files and folders, the image-cache writer and main-process-only
writes."""

from __future__ import annotations

import io as stdio

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.classifier import training
from cxrlib.classifier.training import TrainResult, train_or_load
from cxrlib.core import processes
from cxrlib.core.files import atomic_path, atomic_write_parquet, atomic_write_text, replace_folder
from cxrlib.core.processes import on_main
from cxrlib.core.schema import ClassifierSpec
from cxrlib.data.imagecache import ImageCache, write_image_cache


class Boom(RuntimeError):
    """The failure the tests inject into a writer."""


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    frame = pd.DataFrame({"a": [1, 2]})
    atomic_write_parquet(frame, tmp_path / "t.parquet")
    assert path.read_text() == "second"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "t.parquet"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")
    with pytest.raises(Boom), atomic_path(path) as tmp:
        tmp.write_text("half written")
        raise Boom
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_temporary_keeps_the_suffix_writers_choose_formats_by(tmp_path):
    """np.save appends .npy to a name without it; the file must land where it is renamed from."""
    arr = np.arange(6).reshape(2, 3)
    with atomic_path(tmp_path / "a.npy") as tmp:
        np.save(tmp, arr)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_replace_folder_swaps_in_the_new_folder(tmp_path):
    folder = tmp_path / "model"
    for text in ("v1", "v2"):
        with replace_folder(folder) as tmp:
            (tmp / "weights").write_text(text)
    assert (folder / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or old copy left


def test_replace_folder_keeps_the_old_folder_when_the_writer_raises(tmp_path):
    folder = tmp_path / "model"
    with replace_folder(folder) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(Boom), replace_folder(folder) as tmp:
        (tmp / "weights").write_text("half")
        raise Boom
    assert [p.name for p in folder.iterdir()] == ["weights"]
    assert (folder / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _images(n: int, res: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, res, res), dtype=np.uint8)


def test_cache_writer_round_trips_through_image_cache_and_compacts(tmp_path):
    images = _images(5)
    ids = [f"img{i}" for i in range(5)]
    with write_image_cache(tmp_path / "cache", 7, 8) as cache:  # two rows never filled
        cache.add(ids[:2], images[:2])
        cache.add(ids[2:], images[2:])
    read = ImageCache(tmp_path / "cache")
    assert read.image_ids == ids and read.images.shape == (5, 8, 8)
    np.testing.assert_array_equal(read.load(["img3", "img0"]), images[[3, 0]])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy",
                                                                       "index.parquet"]


def test_cache_writer_keeps_the_on_disk_format(tmp_path):
    """The images file is byte for byte what np.save writes, so older caches stay readable."""
    images = _images(3)
    with write_image_cache(tmp_path / "cache", 3, 8) as cache:
        cache.add(["a", "b", "c"], images)
    reference = stdio.BytesIO()
    np.save(reference, images)
    assert (tmp_path / "cache" / "images.npy").read_bytes() == reference.getvalue()
    assert pd.read_parquet(tmp_path / "cache" / "index.parquet").equals(
        pd.DataFrame({"image_id": ["a", "b", "c"]}))


def test_a_failed_cache_write_keeps_the_existing_cache(tmp_path):
    with write_image_cache(tmp_path / "cache", 2, 8) as cache:
        cache.add(["a", "b"], _images(2))
    with pytest.raises(Boom), write_image_cache(tmp_path / "cache", 3, 8) as cache:
        cache.add(["x"], _images(1, seed=1))
        raise Boom
    assert ImageCache(tmp_path / "cache").image_ids == ["a", "b"]
    np.testing.assert_array_equal(ImageCache(tmp_path / "cache").load(["a", "b"]), _images(2))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy",
                                                                       "index.parquet"]


def test_on_main_runs_only_on_the_main_process(monkeypatch):
    calls = []
    assert on_main(lambda: calls.append("ran") or 7) == 7
    with pytest.raises(Boom):
        on_main(lambda: (_ for _ in ()).throw(Boom()))
    monkeypatch.setattr(processes, "is_main_process", lambda: False)
    assert on_main(lambda: calls.append("ran on another process")) is None
    assert calls == ["ran"]


def _fake_training(monkeypatch):
    """train_classifier returns a tiny model at once (the test is about where it is saved)."""
    result = TrainResult(torch.nn.Linear(2, 2), pd.DataFrame({"epoch": [1]}), 1, False)
    monkeypatch.setattr(training, "train_classifier", lambda *args, **kwargs: result)


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img{i}" for i in range(n)]})


def test_train_or_load_saves_on_the_main_process(tmp_path, monkeypatch):
    _fake_training(monkeypatch)
    train_or_load(ClassifierSpec(), _rows(4), _rows(2), None, tmp_path / "model")
    assert (tmp_path / "model" / "classifier.json").exists()
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_train_or_load_writes_nothing_on_another_process(tmp_path, monkeypatch):
    """Under ``accelerate launch`` every process trains; only the main one may save."""
    _fake_training(monkeypatch)
    monkeypatch.setattr(processes, "is_main_process", lambda: False)
    train_or_load(ClassifierSpec(), _rows(4), _rows(2), None, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
