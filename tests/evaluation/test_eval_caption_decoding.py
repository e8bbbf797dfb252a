"""Beam search over a vocabulary given as a subset of token ids (the demo's `words` set): rows map
to token ids for EOT freezing, for the words fed back, and for the returned ids."""
import pytest
import torch

import eval_fakes as F
from uniperceiver.modeling.attributes import task_attributes
from uniperceiver.modeling.batch import Segment, Sequence
from uniperceiver.tasks.captioning import EOT_ID, beam_search


@pytest.fixture(scope="module")
def setup():
    model = F.tiny_model(seed=4)
    gen = torch.Generator().manual_seed(0)
    vocab = torch.nn.functional.normalize(torch.randn(49411, model.cfg.d_model, generator=gen), dim=-1)
    rows = task_attributes("image_caption")
    prefix = Sequence([Segment("image", torch.randn(3, 3, F.IMAGE, F.IMAGE, generator=gen))], attributes_SA=rows[:1])
    return model, vocab, prefix, rows[1:]


def test_permuted_full_vocabulary_gives_the_same_captions(setup):
    model, vocab, prefix, text_rows = setup
    ref = beam_search(model, prefix, text_rows, vocab, beam_size=2, max_len=6, len_penalty=2.0)
    perm = torch.randperm(49411, generator=torch.Generator().manual_seed(1))
    out = beam_search(model, prefix, text_rows, vocab[perm], beam_size=2, max_len=6, len_penalty=2.0,
                      vocab_token_ids_V=perm)
    assert torch.equal(out.ids_BT, ref.ids_BT)
    torch.testing.assert_close(out.logprobs_BT, ref.logprobs_BT)


def test_subset_decodes_only_its_words_and_needs_eot(setup):
    model, vocab, prefix, text_rows = setup
    subset = torch.tensor(sorted({5, 17, 320, 1000, 2368, 40000, EOT_ID}))
    out = beam_search(model, prefix, text_rows, vocab[subset], beam_size=2, max_len=8, vocab_token_ids_V=subset)
    assert set(out.ids_BT.flatten().tolist()) <= set(subset.tolist())
    # once a caption ends it stays ended
    for row in out.ids_BT.tolist():
        if EOT_ID in row:
            assert all(t == EOT_ID for t in row[row.index(EOT_ID):])
    no_eot = subset[subset != EOT_ID]
    with pytest.raises(ValueError, match="lacks <\\|endoftext\\|>"):
        beam_search(model, prefix, text_rows, vocab[no_eot], vocab_token_ids_V=no_eot)
