"""Two evaluation processes (torchrun-style environment, gloo) give exactly the metrics and
captions of one process: contiguous shards, no padding duplicates, records gathered by index."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval_fakes as F
from uniperceiver.config import to_dict
from uniperceiver.evaluation import evaluate, gather_records, shard_range

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_shard_range_covers_once():
    for n in (0, 1, 5, 13, 64):
        for world in (1, 2, 3, 8):
            parts = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(RuntimeError, match="exactly once"):
        gather_records([(0, "a"), (0, "b")], 2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.world_size(2)
def test_two_processes_match_one(tmp_path, fake_data):
    model = F.tiny_model(seed=3)
    path = tmp_path / "model.pt"
    torch.save({"config": to_dict(model.cfg), "model": model.state_dict()}, path)
    overrides = [f"eval.cache_dir={tmp_path / 'cache'}"]

    # one process, in this one; it also fills the target-set cache the two ranks then read
    cfg = F.run_config(model.cfg, extra=overrides)
    single = evaluate(cfg, model=model, progress=False, caption_scorers=("BLEU", "CIDEr"))

    for r in _two_ranks(tmp_path, [str(path)], overrides):  # every rank reports the same as one process
        assert r["metrics"] == single.metrics
        assert r["predictions"] == single.predictions


def _two_ranks(tmp_path, source: list[str], overrides: list[str], expect_rc: int = 0, env: dict | None = None) -> list:
    """Run eval_fakes.main on 2 gloo ranks (torchrun's environment variables), with a timeout;
    their JSON outputs (expect_rc 0) or their logs."""
    env_base = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
                "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for rank in range(2):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        out = tmp_path / f"rank{rank}.json"
        procs.append((out, subprocess.Popen([sys.executable, os.path.join(HERE, "eval_fakes.py"), *source, str(out),
                                             *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    logs = []
    try:
        for out, p in procs:
            log, _ = p.communicate(timeout=150)
            logs.append(log.decode())
            assert (p.returncode == 0) == (expect_rc == 0), logs[-1][-3000:]
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads(out.read_text()) for out, _ in procs] if expect_rc == 0 else logs


@pytest.mark.world_size(2)
def test_an_error_on_one_rank_stops_both(tmp_path):
    """Rank 1 meets a broken sample: both ranks stop with the message (none waits forever)."""
    model = F.tiny_model(seed=3)
    path = tmp_path / "model.pt"
    torch.save({"config": to_dict(model.cfg), "model": model.state_dict()}, path)
    logs = _two_ranks(tmp_path, [str(path)], ["eval.tasks=[ret]"], expect_rc=1, env={"EVAL_FAKES_FAIL_AT": "12"})
    assert "ValueError: sample 12 is broken" in logs[1]
    assert "rank 1 failed: ValueError: sample 12 is broken" in logs[0]


DEMO_TASKS = """
tasks:
  - {name: emoji_caption, type: image_caption, target_set: words, max_text_len: 16, max_gen_len: 5,
     eval_batch_size: 5, eval_data: {format: demo, options: {source: emoji, subset: heldout}, limit: 11}}
  - {name: emoji_retrieval, type: image_retrieval, max_text_len: 16, eval_batch_size: 7,
     eval_data: {format: demo, options: {source: emoji, subset: heldout}, limit: 45}}
  - {name: emoji_group_zeroshot, type: image_classification, target_set: emoji_groups, eval_batch_size: 6,
     eval_data: {format: demo, options: {source: emoji, subset: heldout, label: group}, limit: 45}}
"""


@pytest.mark.world_size(2)
def test_two_processes_match_one_on_demo_data(tmp_path):
    """The real readers, collates and target sets (a vocabulary subset for captioning) of the
    packaged demo data, through a saved checkpoint."""
    from uniperceiver.config import RunConfig, load_config
    from uniperceiver.modeling.model import UniPerceiver

    cfg_path = tmp_path / "demo_eval.yaml"
    cfg_path.write_text(f"_base_: {os.path.join(ROOT, 'configs/zeroshot/demo.yaml')}\n{DEMO_TASKS}")
    cfg = load_config(RunConfig, cfg_path)
    torch.manual_seed(5)
    ckpt = tmp_path / "demo_model.pt"
    UniPerceiver(cfg.model).save_pretrained(ckpt)
    overrides = [f"eval.checkpoint={ckpt}"]
    single = evaluate(load_config(RunConfig, cfg_path, overrides), progress=False, caption_scorers=("BLEU", "CIDEr"))
    assert single.num_samples == {"emoji_caption": 11, "emoji_retrieval": 45, "emoji_group_zeroshot": 45}
    assert all(set(p) == {"id", "caption"} for p in single.predictions["emoji_caption"])
    for r in _two_ranks(tmp_path, [str(cfg_path)], overrides):
        assert r["metrics"] == single.metrics
        assert r["predictions"] == single.predictions
