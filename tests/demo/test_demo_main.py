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



def test_demo_bad_reader_option_exits_2(tmp_path, monkeypatch, capsys):
    from uniperceiver.demo import __main__ as demo_main

    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"""_base_: {demo_main.CONFIG}
tasks:
  - name: fashion_mnist
    type: image_classification
    target_set: fashion
    train_data: {{format: demo, options: {{source: fashion_mnist, subsett: train}}}}
""")
    monkeypatch.setattr(demo_main, "CONFIG", cfg)
    assert main([f"train.output_dir={tmp_path / 'demo'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'tasks[0].train_data.options.subsett'" in err
    assert "did you mean 'tasks[0].train_data.options.subset'" in err
    assert not (tmp_path / "demo" / "checkpoints").exists()
