"""The README's main command, shortened: train a few steps on the demo data, evaluate zero-shot."""
from uniperceiver.demo.__main__ import main


def test_demo_trains_and_reports_zero_shot_next_to_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main([f"train.output_dir={out}", "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1",
                 "eval.tasks=[emoji_retrieval, emoji_group_zeroshot]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chance" in printed and "emoji_group_zeroshot" in printed and "i2t_R@1" in printed
    # chance of 9-way top-1 and of R@1 among the 308 held-out emoji
    assert "11.11" in printed and "0.32" in printed
    assert (out / "checkpoints" / "step_00000003.pt").exists()
    assert list((out / "tensorboard").iterdir())
