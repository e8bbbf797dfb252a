"""The README's main command, shortened: train a few steps on the demo data, evaluate zero-shot."""
import pytest

from uniperceiver.demo.__main__ import main


def test_demo_trains_and_reports_zero_shot_next_to_chance_then_prompt_tunes(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main([f"train.output_dir={out}", "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1",
                 "eval.tasks=[emoji_retrieval, emoji_group_zeroshot]", "adapt.train.max_steps=2",
                 "adapt.train.checkpoint_every=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chance" in printed and "emoji_group_zeroshot" in printed and "i2t_R@1" in printed
    # chance of 9-way top-1 and of R@1 among the 308 held-out emoji
    assert "11.11" in printed and "0.32" in printed
    assert (out / "checkpoints" / "step_00000003.pt").exists()
    assert list((out / "tensorboard").iterdir())

    # The adaptation row: task, chance, zero-shot (the table's emoji_group_zeroshot top1), prompt-tuned, adapter size
    lines = printed.splitlines()
    zero_shot = next(line.split()[2] for line in lines if line.startswith("emoji_group_zeroshot") and " top1 " in line)
    header = lines.index(next(line for line in lines if "prompt-tuned" in line and "adapter" in line))
    task, metric, chance, zs, tuned, size, unit = lines[header + 1].split()
    assert (task, metric, chance, zs, unit) == ("emoji_group", "top1", "11.11", zero_shot, "KB")
    assert 0.0 <= float(tuned) <= 100.0
    adapter = out / "prompt_tuning" / "adapter.pt"
    assert abs(float(size) - adapter.stat().st_size / 1024) < 0.06
    assert "prompt-tuned on 16 of 1562 training emoji (none of the 308 evaluated), 2 steps" in printed

    # The adapter round-trips onto the demo's checkpoint (the base) and holds what the run trained.
    import torch

    from uniperceiver.modeling.model import UniPerceiver

    base = out / "checkpoints" / "step_00000003.pt"
    tuned = torch.load(out / "prompt_tuning" / "checkpoints" / "step_00000002.pt", weights_only=False)["model"]
    loaded = UniPerceiver.from_pretrained(base, adapter=adapter).state_dict()
    assert loaded.keys() == tuned.keys()
    for key, value in tuned.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["predictor.fc_prompt.weight"].abs().sum() > 0  # the FC prompt trained away from its zero start


def test_the_adaptation_never_trains_on_an_evaluated_emoji_it_scores():
    from uniperceiver.config import ConfigError, RunConfig, load_config
    from uniperceiver.demo.__main__ import CONFIG
    from uniperceiver.demo.adapt import adaptation_config, check_no_leakage

    demo = load_config(RunConfig, str(CONFIG))
    for fraction in ("0.01", "1.0"):  # the demo's 1 %, and every training emoji
        cfg = adaptation_config(demo, "unused.pt", [f"train.data_fraction={fraction}"])
        trained, pool, evaluated = check_no_leakage(cfg)
        assert (pool, evaluated) == (1562, 308) and trained == (16 if fraction == "0.01" else 1562)
    # the check is not vacuous: training on the held-out emoji is caught
    leaky = adaptation_config(demo, "unused.pt", ["tasks.emoji_group.train_data.options.subset=heldout"])
    with pytest.raises(ConfigError, match="holds 3 evaluated emoji"):
        check_no_leakage(leaky)



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
