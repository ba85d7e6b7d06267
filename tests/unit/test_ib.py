"""The information-bottleneck MIL head: keep probabilities, training, top-K selection and files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from efcm.config import IbParams
from efcm.models.ib import IBHead, bernoulli_kl, load_ib, relaxed_bernoulli, save_ib, select_top_k
from efcm.training.ib import read_top_k, train_ib, write_top_k, write_top_k_slides

D = 16
N_SHIFTED = 4
CFG = IbParams(hidden=32, epochs=10, lr=5e-3)


def make_bags(
    signal: bool, n_bags: int = 24, n: int = 40, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, set[int]]]:
    """Random bags; with `signal`, positive bags hold a few shifted instances (their indices are
    returned); without it, every bag has the same distribution and the labels are random."""
    g = torch.Generator().manual_seed(seed)
    bags, labels, shifted = {}, {}, {}
    for b in range(n_bags):
        x = torch.randn(n, D, generator=g)
        idx = torch.randperm(n, generator=g)[:N_SHIFTED]
        if signal:
            y = b % 2
            if y:
                x[idx, :4] += 3.0
        else:
            y = int(torch.randint(0, 2, (1,), generator=g))
        sid = f"s{b:02d}"
        bags[sid], labels[sid], shifted[sid] = x, y, set(idx.tolist())
    return bags, labels, shifted


def mean_keep(head: IBHead, bags: dict[str, torch.Tensor]) -> float:
    return float(np.mean([head.keep_probability(b).mean().item() for b in bags.values()]))


def test_keep_probability_starts_at_one_half_and_is_not_sampled():
    torch.manual_seed(0)
    head = IBHead(D, 2, hidden=32).train()  # training mode: keep_probability still never samples
    bag = torch.randn(50, D)
    a, b = head.keep_probability(bag), head.keep_probability(bag)
    assert a.shape == (50,)
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5) < 0.1


def test_without_class_signal_keep_probability_moves_to_the_prior():
    bags, labels, _ = make_bags(signal=False)
    torch.manual_seed(0)
    init = mean_keep(IBHead(D, 2, hidden=CFG.hidden), bags)
    head = train_ib(bags, labels, sorted(bags), 2, CFG, seed=0)
    after = mean_keep(head, bags)
    assert abs(after - CFG.prior) < abs(init - CFG.prior)
    assert abs(after - CFG.prior) < 0.1


def test_with_class_signal_the_shifted_instances_are_kept_first():
    bags, labels, shifted = make_bags(signal=True)
    head = train_ib(bags, labels, sorted(bags), 2, CFG, seed=0)
    recalls = []
    for sid, bag in bags.items():
        if labels[sid] == 1:
            idx, _ = select_top_k(head, bag, np.zeros((len(bag), 2)), N_SHIFTED)
            recalls.append(len(set(idx.tolist()) & shifted[sid]) / N_SHIFTED)
    assert np.mean(recalls) >= 0.8


def test_training_is_deterministic_for_a_seed():
    bags, labels, _ = make_bags(signal=True, n_bags=8, n=20)
    cfg = CFG.model_copy(update={"epochs": 2})
    a = train_ib(bags, labels, sorted(bags), 2, cfg, seed=3).state_dict()
    b = train_ib(bags, labels, sorted(bags), 2, cfg, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lower_temperature_gives_masks_closer_to_zero_or_one():
    logits = torch.zeros(2000)
    cold = relaxed_bernoulli(logits, 0.1, 4, torch.Generator().manual_seed(0))
    warm = relaxed_bernoulli(logits, 1.0, 4, torch.Generator().manual_seed(0))
    assert cold.shape == (4, 2000)
    assert ((cold > 0) & (cold <= 1)).all()

    def spread(m: torch.Tensor) -> float:
        return torch.minimum(m, 1 - m).mean().item()  # 0 for hard 0/1 masks

    assert spread(cold) < 0.5 * spread(warm)


def test_the_head_samples_masks_at_its_temperature():
    torch.manual_seed(0)
    bag = torch.randn(30, D)
    spreads = {}
    for t in (0.05, 2.0):
        head = IBHead(D, 2, hidden=32, temperature=t, samples=6).train()
        out = head(bag, generator=torch.Generator().manual_seed(1))
        assert out["masks"].shape == (6, 30) and out["logits"].shape == (6, 2)
        spreads[t] = torch.minimum(out["masks"], 1 - out["masks"]).mean().item()
    assert spreads[0.05] < 0.5 * spreads[2.0]
    out = head.eval()(bag)
    assert out["logits"].shape == (1, 2)
    assert torch.allclose(out["masks"][0], head.keep_probability(bag))


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    prior = 0.1
    at_prior = torch.tensor([np.log(prior / (1 - prior))])
    assert bernoulli_kl(at_prior, prior).abs().item() < 1e-6
    assert (bernoulli_kl(torch.tensor([-5.0, 0.0, 5.0]), prior) > 0).all()


def test_select_top_k_respects_k_and_sorts_by_keep_probability():
    torch.manual_seed(0)
    head = IBHead(D, 2, hidden=32).eval()
    bag = torch.randn(100, D)
    coords = np.arange(200).reshape(100, 2) * 64
    idx, top = select_top_k(head, bag, coords, 10)
    probs = head.keep_probability(bag).numpy()
    assert idx.dtype == np.int64 and idx.shape == (10,)
    assert np.array_equal(top, coords[idx])
    assert np.all(np.diff(probs[idx]) <= 0)
    assert probs[idx].min() >= np.sort(probs)[-10]


def test_select_top_k_returns_every_instance_of_a_smaller_slide():
    torch.manual_seed(0)
    head = IBHead(D, 2, hidden=32).eval()
    bag = torch.randn(7, D)
    idx, top = select_top_k(head, bag, np.arange(14).reshape(7, 2), 512)
    assert sorted(idx.tolist()) == list(range(7))
    assert np.all(np.diff(head.keep_probability(bag).numpy()[idx]) <= 0)
    assert top.shape == (7, 2)


def test_empty_bag_is_an_error_naming_the_slide_and_shape(tmp_path):
    head = IBHead(D, 2, hidden=32).eval()
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        select_top_k(head, torch.zeros(0, D), np.zeros((0, 2)), 5)
    with pytest.raises(ValueError, match=r"slide_007.*\[0, 16\]"):
        write_top_k(head, "slide_007", torch.zeros(0, D), np.zeros((0, 2)), tmp_path, 5)
    assert not (tmp_path / "topk" / "slide_007.h5").exists()
    bags = {"a": torch.randn(5, D), "b": torch.zeros(0, D)}
    with pytest.raises(ValueError, match=r"slide b"):
        train_ib(bags, {"a": 0, "b": 1}, ["a", "b"], 2, CFG, seed=0)


def test_top_k_file_is_written_atomically_and_opens_as_coords(tmp_path):
    from efcm.slides.patching import read_coords

    torch.manual_seed(0)
    head = IBHead(D, 2, hidden=32).eval()
    bag = torch.randn(20, D)
    coords = np.stack([np.arange(20) * 64, np.zeros(20)], 1).astype(np.int64)
    attrs = {"patch_size": 64, "patch_level": 0, "read_size": 64, "name": "s1", "step0": 64}
    path = write_top_k(head, "s1", bag, coords, tmp_path, 5, coords_attrs=attrs)
    assert path == tmp_path / "topk" / "s1.h5"
    assert [p.name for p in (tmp_path / "topk").iterdir()] == ["s1.h5"]  # no .part left
    idx, top, keep = read_top_k(path)
    expected, _ = select_top_k(head, bag, coords, 5)
    assert np.array_equal(idx, expected)
    assert np.array_equal(top, coords[idx])
    assert np.allclose(keep, head.keep_probability(bag).numpy()[idx])
    assert np.array_equal(read_coords(path).coords, coords[idx])


def test_top_k_for_every_slide_of_a_features_folder(tmp_path):
    from efcm.slides.patching import read_coords

    torch.manual_seed(0)
    head = IBHead(D, 2, hidden=32).eval()
    bags = {}
    for sid, n in (("a", 12), ("b", 3)):
        bags[sid] = np.random.default_rng(len(sid) + n).standard_normal((n, D)).astype(np.float32)
        coords = np.stack([np.arange(n) * 64, np.full(n, 128)], 1).astype(np.int64)
        for folder, name, data in (("features", "features", bags[sid]), ("patches", None, None)):
            (tmp_path / folder).mkdir(exist_ok=True)
            with h5py.File(tmp_path / folder / f"{sid}.h5", "w") as f:
                if name:
                    f.create_dataset(name, data=data)
                d = f.create_dataset("coords", data=coords)
                d.attrs.update({"patch_size": 64, "patch_level": 0, "read_size": 64, "name": sid})
    paths = write_top_k_slides(head, tmp_path, ["a", "b"], tmp_path / "ib", 5, tmp_path)
    assert paths == [tmp_path / "ib" / "topk" / "a.h5", tmp_path / "ib" / "topk" / "b.h5"]
    idx_a, coords_a, _ = read_top_k(paths[0])
    assert len(idx_a) == 5 and np.array_equal(coords_a[:, 0], idx_a * 64)
    expected, _ = select_top_k(head, torch.from_numpy(bags["a"]), np.zeros((12, 2)), 5)
    assert np.array_equal(idx_a, expected)
    assert sorted(read_top_k(paths[1])[0].tolist()) == [0, 1, 2]
    assert read_coords(paths[1]).read_size == 64


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = IBHead(D, 3, hidden=32, temperature=0.2, samples=4, prior=0.2).eval()
    save_ib(tmp_path / "ib.pt", head)
    loaded = load_ib(tmp_path / "ib.pt")
    assert loaded.config() == head.config()
    bag = torch.randn(9, D)
    assert torch.equal(loaded.keep_probability(bag), head.keep_probability(bag))
