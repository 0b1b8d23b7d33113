"""Sequence parallelism applied to a built model (fmtrain/parallel/sequence.py). The numerics of
the sequence-parallel attention are tests/attention/test_sequence_parallel.py's; the trainer's
tests/parallel/test_sp_train.py's."""
import pytest

from fmtrain.attention import FullAttention, MultipoleAttention
from fmtrain.config import ModelConfig
from fmtrain.model import build_model
from fmtrain.parallel import apply_sequence_parallel


def model(attention: str):
    return build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, block_size=16,
                                   attention=attention, max_seq_len=256))


@pytest.mark.parametrize("attention", ["fma", "local"])
def test_every_attention_layer_takes_the_group_and_nothing_else_changes(attention):
    group = object()  # any group: the layers only keep it for fma
    m = model(attention)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert apply_sequence_parallel(m, group) is m
    layers = [x for x in m.modules() if isinstance(x, MultipoleAttention)]
    assert len(layers) == 2 and all(x.sp_group is group for x in layers)
    assert m.trunk.sp_group is group  # it gathers the documents' bounds over the group
    assert all((before[k] == v).all() for k, v in m.state_dict().items())  # parameters untouched
    assert model(attention).trunk.blocks[0].attn.sp_group is None  # built plain, for one device


def test_no_group_leaves_the_model_local_and_full_attention_is_refused_by_name():
    m = model("sdpa")
    assert apply_sequence_parallel(m, None) is m
    assert all(x.sp_group is None for x in m.modules() if isinstance(x, FullAttention))
    with pytest.raises(ValueError, match=r"not 'sdpa' \(layer trunk.blocks.0.attn\).*parallel.sequence=1"):
        apply_sequence_parallel(m, object())
