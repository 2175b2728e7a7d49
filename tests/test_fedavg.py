import pytest
import torch

from hf_lpft.federated.fedavg import fedavg_weights, run_fedavg, sample_clients
from hf_lpft.models.backbone import build_model
from hf_lpft.train.loop import OptimSettings


def test_fedavg_matches_hand_calculation():
    s1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    s2 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    avg = fedavg_weights([s1, s2], [1, 3])  # weights by examples: 1/4 and 3/4
    assert torch.allclose(avg["w"], torch.tensor([(1 * 1 + 3 * 3) / 4, (2 * 1 + 6 * 3) / 4]))
    assert avg["w"].dtype == torch.float32
    assert avg["n"].item() == 5 and avg["n"].dtype == torch.int64  # integer buffers are not averaged


def test_fedavg_weights_by_examples_not_clients():
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert fedavg_weights([a, b], [10, 30])["w"].item() == pytest.approx(0.75)
    assert fedavg_weights([a, b], [1, 1])["w"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("states,counts", [([], []), ([{"w": torch.zeros(1)}], [0]), ([{"w": torch.zeros(1)}], [1, 2])])
def test_fedavg_rejects_bad_input(states, counts):
    with pytest.raises(ValueError):
        fedavg_weights(states, counts)


def test_sample_clients_fraction():
    import numpy as np

    rng = np.random.default_rng(0)
    assert sample_clients(10, 1.0, rng) == list(range(10))
    picked = sample_clients(10, 0.3, rng)
    assert len(picked) == 3 and len(set(picked)) == 3


def test_one_round_equals_weighted_average_of_local_models(tiny_clients, accelerator):
    """The driver's aggregate equals fedavg_weights over independently trained local copies."""
    from hf_lpft.train.loop import derive_seed, train_phase
    from hf_lpft.train.phase import Phase

    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = OptimSettings(batch_size=16)
    states, counts = [], []
    for c in tiny_clients:
        local = build_model("timm:test_resnet", num_classes=4, image_size=32)
        local.load_state_dict(start)
        train_phase(local, Phase("fedavg_local", "all", 1, 0.05), c, settings=settings, accelerator=accelerator,
                    seed=derive_seed(7, "fedavg", 0, c.client_id))
        states.append(local.state_dict())
        counts.append(c.n_train)
    expected = fedavg_weights(states, counts)
    run_fedavg(model, tiny_clients, rounds=1, local_epochs=1, lr=0.05, client_fraction=1.0, settings=settings,
               accelerator=accelerator, seed=7)
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), expected[k].float(), atol=1e-6), k
