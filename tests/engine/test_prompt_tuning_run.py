"""A real prompt-tuning run: starts from a base model file, trains only the release's trainable
set on a data fraction, writes an adapter that loads back onto the base."""
import torch

from engine_utils import run_train, write_tiny_run

from uniperceiver.config import RunConfig, load_config
from uniperceiver.modeling.model import UniPerceiver


def test_prompt_tuning_run_trains_only_prompts_and_writes_an_adapter(tmp_path):
    run = write_tiny_run(tmp_path, max_steps=3, checkpoint_every=3)
    torch.manual_seed(0)
    base = UniPerceiver(load_config(RunConfig, run).model)
    base.save_pretrained(tmp_path / "base.pt")

    tuned_run = run_train([str(run), f"train.init_from={tmp_path / 'base.pt'}", "model.prompt.enabled=true",
                           "model.prompt.input_length=4", "model.prompt.fc_prompt_out=4",
                           "model.prompt.fc_prompt_tasks=[cls]", "train.data_fraction=0.5"])
    assert tuned_run.returncode == 0, tuned_run.stderr[-3000:]
    assert "training on 8 of 16 samples" in tuned_run.stdout + tuned_run.stderr
    tuned = torch.load(tmp_path / "out" / "checkpoints" / "step_00000003.pt", weights_only=False)["model"]
    for key, value in base.state_dict().items():
        if not ("norm" in key or "ln_post" in key):
            assert torch.equal(tuned[key], value), f"frozen {key} moved"
    assert not torch.equal(tuned["predictor.ln_post.weight"], base.state_dict()["predictor.ln_post.weight"])
    assert tuned["predictor.fc_prompt.weight"].abs().sum() > 0  # it trained away from zero
    loaded = UniPerceiver.from_pretrained(tmp_path / "base.pt", adapter=tmp_path / "out" / "adapter.pt")
    for key, value in tuned.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_single_task_retrieval_on_two_ranks_gathers_negatives_on_a_data_fraction(tmp_path):
    run = write_tiny_run(tmp_path, max_steps=2, checkpoint_every=2)
    proc = run_train([str(run), "tasks.cls.train_data=null", "train.data_fraction=0.5", "train.device=cpu"],
                     nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "task ret: the other 1 ranks' features join as negatives" in logs
    assert "task ret: training on 8 of 16 samples" in logs
    assert (tmp_path / "out" / "checkpoints" / "step_00000002.pt").exists()


def test_a_sharded_prompt_tuning_run_writes_the_same_adapter_its_checkpoint_holds(tmp_path):
    """FSDP on 2 ranks: the adapter's tensors are gathered from the shards; they equal the
    consolidated distributed checkpoint's, and the adapter loads onto its base."""
    from uniperceiver.engine import dcp

    run = write_tiny_run(tmp_path, max_steps=2, checkpoint_every=2)
    torch.manual_seed(0)
    base = UniPerceiver(load_config(RunConfig, run).model)
    base.save_pretrained(tmp_path / "base.pt")
    proc = run_train([str(run), f"train.init_from={tmp_path / 'base.pt'}", "model.prompt.enabled=true",
                      "model.prompt.input_length=4", "train.fsdp=true", "train.device=cpu",
                      "train.sampling=round_robin"], nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    directory = dcp.latest_dcp_checkpoint(tmp_path / "out")[1]
    tuned, _ = dcp.consolidate_model_state(directory)
    loaded = UniPerceiver.from_pretrained(tmp_path / "base.pt", adapter=tmp_path / "out" / "adapter.pt").state_dict()
    for key, value in tuned.items():
        assert torch.equal(loaded[key], value), key
    assert not torch.equal(loaded["predictor.ln_post.weight"], base.state_dict()["predictor.ln_post.weight"])
