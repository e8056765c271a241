"""Hugging Face encoders with exits (tiny random models; the pretrained MiniLM is for the
benchmarks only)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the `hf` extra is not installed")

from offramp import FitConfig, check_network, fit  # noqa: E402
from offramp.errors import ConfigError  # noqa: E402
from offramp.models.hf import encode, hf_encoder  # noqa: E402

from .families import padded_ids  # noqa: E402

SMALL = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64)


def bert(**kw):
    torch.manual_seed(0)
    return transformers.BertModel(
        transformers.BertConfig(num_hidden_layers=3, **SMALL, **kw)
    ).eval()


def roberta():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(num_hidden_layers=3, pad_token_id=1, **SMALL)
    return transformers.RobertaModel(cfg).eval()


def distilbert():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=50, dim=32, n_layers=3, n_heads=4, hidden_dim=64, pad_token_id=0
    )
    return transformers.DistilBertModel(cfg).eval()


MODELS = {"bert": bert, "roberta": roberta, "distilbert": distilbert}


def ids_for(model, n=16, t=14):
    """Token ids 2 … 49, right-padded with the model's pad id (0 for BERT, 1 for RoBERTa)."""
    x = padded_ids(n, t)
    return torch.where(x != 0, x.clamp_min(2), model.config.pad_token_id)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layers_one_by_one_reproduce_the_encoder(name):
    model = MODELS[name]()
    x = ids_for(model)
    real = x != model.config.pad_token_id
    net = hf_encoder(model, 3)
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=real.long()).last_hidden_state
        h = x
        for block in net.blocks:
            h = block(h)
        hidden, pad = h
    assert torch.equal(pad, ~real)
    torch.testing.assert_close(hidden[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("head", ["cls", "mean"])
def test_every_encoder_conforms(name, head):
    model = MODELS[name]()
    report = check_network(hf_encoder(model, 3, head=head), ids_for(model))
    assert report.passed, str(report)


def test_pooler_head_starts_from_the_pretrained_pooler_and_shared_head_is_one_module():
    model = bert()
    net = hf_encoder(model, 2, head="pooler")
    dense = net.heads[0][1]
    assert torch.equal(dense.weight, model.pooler.dense.weight) and dense is not model.pooler.dense
    assert net.heads[0][1] is not net.heads[1][1]  # one pooler copy per exit
    shared = hf_encoder(model, 2, head="pooler", shared_head=True, exits_after=[0])
    assert shared.exit_blocks == (0, 2) and shared.heads[0] is shared.heads[1]
    with pytest.raises(ConfigError, match="pooler.*'cls' or 'mean'"):
        hf_encoder(distilbert(), 2, head="pooler")


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"layers 0 … 1"):
        hf_encoder(bert(), 2, exits_after=[2])
    with pytest.raises(ConfigError, match="unknown head"):
        hf_encoder(bert(), 2, head="max")
    with pytest.raises(ConfigError, match="BERT-family encoder.*model.bert"):
        hf_encoder(torch.nn.Linear(2, 2), 2)


def test_trains_with_exits_and_padding_is_trimmed():
    model = bert()
    net = hf_encoder(model, 2)
    x = ids_for(model, 64, 12)
    y = (x[:, 1] % 2).long()  # learnable from the first token
    hist = fit(net, (x, y), FitConfig(epochs=3, lr=3e-3, batch_size=16, show_progress=False))
    assert hist[-1].loss < hist[0].loss
    assert net.trim_padding and net.input_shape == (None,)


def test_encode_pads_on_the_right():
    class Tok:
        padding_side = "right"

        def __call__(self, texts, **kw):
            assert kw["padding"] is True and kw["truncation"] is True
            return {"input_ids": torch.tensor([[101, 7, 102], [101, 102, 0]])}

    assert encode(Tok(), ["a b", ""]).dtype == torch.long
    Tok.padding_side = "left"
    with pytest.raises(ConfigError, match="right"):
        encode(Tok(), ["a"])


def test_patience_runtime_equals_simulation_on_a_shared_head():
    from offramp import EarlyExitRuntime, ExitRecord, simulate
    from offramp.policies import PatiencePolicy

    model = bert()
    net = hf_encoder(model, 3, shared_head=True)  # PABEE: one classifier at every layer
    x = ids_for(model, 32, 14)
    policy = PatiencePolicy(net.num_exits, 1)
    sim = simulate(ExitRecord.collect(net, (x, torch.zeros(32, dtype=torch.long))), policy)
    res = EarlyExitRuntime(net, policy)(x)
    assert res.exits.tolist() == sim.exits.tolist()
    assert res.predictions.tolist() == sim.predictions.tolist()
