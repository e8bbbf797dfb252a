"""MSVD (COCO-style caption json + videos) for video captioning and retrieval."""
import json

import pytest
import torch

from uniperceiver.config import DataSourceConfig, ModelConfig, TaskConfig
from uniperceiver.data import DataError, build_dataset, make_collate
from uniperceiver.tokenization import ClipTokenizer


def write_video(path, frames):
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(frames):
            img = np.full((32, 48, 3), (i * 5) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _msvd(tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "vid1.avi.mp4", frames=40)
    write_video(tmp_path / "clips" / "vid2.mp4", frames=50)
    ann = {"images": [{"id": 1, "file_name": "vid1.avi"}, {"id": 2, "file_name": "vid2"}],
           "annotations": [{"image_id": 1, "caption": "a man is cooking"}, {"image_id": 1, "caption": "someone cooks"},
                           {"image_id": 2, "caption": "a cat plays"}]}
    (tmp_path / "caption_msvd_test_cocostyle.json").write_text(json.dumps(ann))
    return DataSourceConfig(format="msvd", root=str(tmp_path / "clips"), annotations=str(tmp_path), split="test")


@pytest.mark.parametrize("task_type", ["video_caption", "video_retrieval"])
def test_msvd_eval_samples_and_collate(tmp_path, task_type):
    source = _msvd(tmp_path)
    task = TaskConfig(name="msvd", type=task_type, eval_data=source, frames=4, frame_stride=4,
                      target_set="v" if task_type == "video_caption" else None)
    tok = ClipTokenizer()
    ds = build_dataset(task, "eval", tok, ModelConfig(d_model=32, num_heads=4, image_size=32))
    assert len(ds) == 2
    s = ds[0]
    assert s["video"].shape == (4, 3, 32, 32) and s["captions"] == ["a man is cooking", "someone cooks"]
    assert -1.0 <= float(s["video"].min()) and float(s["video"].max()) <= 1.0  # mean = std = 0.5
    batch = make_collate(task, tok, training=False)([ds[0], ds[1]])
    assert batch.inputs.segments[0].modality == "video"
    if task_type == "video_retrieval":
        assert batch.target_owner.tolist() == [0, 0, 1]


def test_msvd_training_draws_one_caption_and_errors_name_the_file(tmp_path):
    source = _msvd(tmp_path)
    train = DataSourceConfig(format="msvd", root=source.root, annotations=str(tmp_path / "caption_msvd_test_cocostyle.json"))
    task = TaskConfig(name="msvd", type="video_retrieval", train_data=train, frames=2, frame_stride=4)
    ds = build_dataset(task, "train", ClipTokenizer(), ModelConfig(d_model=32, num_heads=4, image_size=32))
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert a["caption"] in ("a man is cooking", "someone cooks") and a["caption"] == b["caption"]
    assert torch.equal(a["video"], b["video"])
    (tmp_path / "clips" / "vid2.mp4").unlink()
    with pytest.raises(DataError, match=r"vid2 not found.*caption_msvd_test_cocostyle.json images\[1\]"):
        ds[1]
