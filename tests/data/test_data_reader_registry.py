"""The data-reader registry: one typed options dataclass per format, validated like the config
(unknown key -> error naming it with a suggestion, exit 2), documented in one README table."""
import dataclasses
import typing
from pathlib import Path

import pytest

from uniperceiver.config import ConfigError, RunConfig, TaskConfig, load_config
from uniperceiver.config.schema import DataFormat, DataSourceConfig
from uniperceiver.data import build_dataset, check_reader_options
from uniperceiver.data.readers import READERS, options_table

REPO = Path(__file__).resolve().parents[2]


def test_every_format_has_one_reader_and_its_options_are_documented():
    assert set(READERS) == set(typing.get_args(DataFormat))
    for name, reader in READERS.items():
        assert dataclasses.is_dataclass(reader.options), name
        for f in dataclasses.fields(reader.options):
            assert f.metadata.get("doc"), f"{name}.{f.name} has no doc line"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert options_table() in readme, "README's options table is stale: python -m uniperceiver.data.readers"


def _glue_task(tmp_path, **options) -> TaskConfig:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    return TaskConfig(name="sst", type="text_classification", target_set="v",
                      train_data=DataSourceConfig(format="glue", annotations=str(tmp_path / "train.tsv"),
                                                  options=options))


def test_unknown_option_is_named_with_a_suggestion(tmp_path, tok):
    with pytest.raises(ConfigError, match=r"unknown config key 'train_data\.options\.skip_headers' \(from task "
                                          r"'sst'\); did you mean 'train_data\.options\.skip_header'\?"):
        build_dataset(_glue_task(tmp_path, task="SST-2", skip_headers=True), "train", tok)
    with pytest.raises(ConfigError, match=r"'train_data\.options\.skip_header' .* expects bool, got str"):
        build_dataset(_glue_task(tmp_path, task="SST-2", skip_header="yes"), "train", tok)
    with pytest.raises(ConfigError, match=r"options\.task 'SST2' is not one of"):
        build_dataset(_glue_task(tmp_path, task="SST2"), "train", tok)
    with pytest.raises(ConfigError, match=r"unknown config key 'train_data\.options\.extension'.*takes no keys"):
        build_dataset(TaskConfig(name="in", type="image_classification", target_set="v", train_data=DataSourceConfig(
            format="imagenet", root=str(tmp_path), options={"extension": ".png"})), "train", tok)
    # the right spelling reads the header as a header (3 samples counted otherwise -> a malformed line)
    ds = build_dataset(_glue_task(tmp_path, task="SST-2", skip_header=True), "train", tok)
    assert len(ds) == 2 and ds.options.skip_header is True and ds[0]["label"] == 1


def test_config_check_names_the_task_key_and_training_exits_2(tmp_path, capsys):
    from uniperceiver.train import main as train_main

    (tmp_path / "train.tsv").write_text("good film\t1\n")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""_base_: {REPO / 'configs/model/tiny_dense.yaml'}
target_sets: {{v: {{kind: verbalizer, names: [bad, good]}}}}
tasks:
  - name: sst
    type: text_classification
    target_set: v
    train_data: {{format: glue, annotations: {tmp_path / 'train.tsv'}, options: {{labl_column: 1}}}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 1, tensorboard: false, device: cpu}}
""")
    cfg = load_config(RunConfig, cfg_file)
    with pytest.raises(ConfigError, match=r"'tasks\[0\]\.train_data\.options\.labl_column'.*"
                                          r"did you mean 'tasks\[0\]\.train_data\.options\.label_column'"):
        check_reader_options(cfg, "train")
    check_reader_options(cfg, "eval")  # no eval_data: nothing to check
    assert train_main([str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "labl_column" in err and "label_column" in err and not (tmp_path / "out" / "checkpoints").exists()


def test_path_options_with_an_unset_data_path_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_PATH", raising=False)
    cfg = load_config(RunConfig, data={
        "target_sets": {"c": {"kind": "class_names", "names": ["a", "b"]}},
        "tasks": [{"name": "cls", "type": "image_classification", "target_set": "c",
                   "eval_data": {"format": "jsonl", "root": str(tmp_path),
                                 "options": {"class_names": "$DATA_PATH/classes.txt"}}}]})
    with pytest.raises(ConfigError, match=r"'tasks\[0\]\.eval_data\.options\.class_names' \(task 'cls'\).*\$DATA_PATH"):
        check_reader_options(cfg, "eval")
    monkeypatch.setenv("DATA_PATH", str(tmp_path))
    check_reader_options(cfg, "eval")
