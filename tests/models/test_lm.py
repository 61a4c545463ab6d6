import pytest
import torch

from memlab.models.lm import LM, LMConfig


def test_generate_equals_full_recompute() -> None:
    torch.manual_seed(0)
    model = LM(
        LMConfig(
            vocab_size=50,
            d_model=32,
            layers=[{"mixer": "attention", "n_heads": 4}, {"mixer": "sliding_window", "window": 4}],
        )
    ).double().eval()
    ids = torch.randint(0, 50, (2, 7))
    out = model.generate(ids, 6)
    # Recompute each step from scratch: the cached decode must pick the same tokens.
    ref = ids
    for _ in range(6):
        logits, _ = model(ref)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_tied_embeddings_and_errors() -> None:
    model = LM.from_mixer("attention", vocab_size=20, d_model=16, n_layers=1)
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="layers"):
        LMConfig(vocab_size=10, d_model=8, layers=[])
    with pytest.raises(ValueError, match="ids must"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown mixer"):
        LM.from_mixer("nope", vocab_size=20, d_model=16)


def test_short_conv_decode_matches_forward_and_is_causal() -> None:
    torch.manual_seed(0)
    model = LM(
        LMConfig(vocab_size=30, d_model=16, layers=[{"mixer": "linear_attention", "n_heads": 2}] * 2,
                 short_conv=4)
    ).double().eval()
    ids = torch.randint(0, 30, (2, 9))
    full, _ = model(ids)
    states = model.init_states(2, "cpu", torch.float64)
    steps = []
    for t in range(9):
        out, states = model(ids[:, t : t + 1], states=states)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
    ids2 = ids.clone()
    ids2[:, 5] = (ids2[:, 5] + 1) % 30
    changed, _ = model(ids2)
    torch.testing.assert_close(changed[:, :5], full[:, :5], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="short_conv"):
        LMConfig(vocab_size=10, d_model=8, layers=[{"mixer": "attention"}], short_conv=-1)


def test_mixer_options_may_share_a_name_with_lm_arguments() -> None:
    model = LM.from_mixer("memmamba", vocab_size=20, d_model=16, n_layers=1, mixer_options={"n_layers": 1})
    assert len(model.blocks) == 1 and model.blocks[0].mixer.config.n_layers == 1


def test_generate_runs_in_eval_mode_and_restores_the_mode() -> None:
    """A routing mixer updates its centroids only in training mode: generating from a model left
    in training mode must not move them, and the model comes back in the mode it was in."""
    from memlab.models.lm import LM

    torch.manual_seed(0)
    model = LM.from_mixer("routing", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_clusters=2, window=4)
    model.train()
    model(torch.randint(0, 32, (2, 16)))  # the first training forward initialises the centroids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.generate(torch.randint(0, 32, (2, 8)), max_new_tokens=5)
    assert out.shape == (2, 13)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
