"""CLAM-SB and CLAM-MB: shapes, attention, instance clustering, smooth SVM, save/load, training."""

import math

import numpy as np
import pytest
import torch

from efcm.config import TrainMilParams
from efcm.models.clam import CLAMMB, CLAMSB, build_clam, load_clam, save_clam, smooth_top1_svm
from efcm.training.mil import train_fold

KINDS = {"clam_sb": CLAMSB, "clam_mb": CLAMMB}


@pytest.mark.parametrize("cls", [CLAMSB, CLAMMB])
@pytest.mark.parametrize("c", [2, 3])
def test_shapes_and_attention_sums_to_one(cls, c):
    torch.manual_seed(0)
    m = cls(16, c, hidden=8, attn_dim=4).eval()
    out = m(torch.randn(37, 16), label=c - 1)
    assert out["logits"].shape == (1, c) and out["probs"].shape == (1, c)
    assert out["attention"].shape == (37,) and out["scores"].shape == (37,)
    assert torch.isclose(out["attention"].sum(), torch.tensor(1.0))
    assert torch.isclose(out["probs"].sum(), torch.tensor(1.0))
    assert out["instance_loss"].shape == () and out["instance_loss"] > 0
    if cls is CLAMMB:
        assert out["attention_all"].shape == (c, 37) and out["scores_all"].shape == (c, 37)
        assert torch.allclose(out["attention_all"].sum(1), torch.ones(c))
        pred = int(out["logits"].argmax())
        assert torch.equal(out["attention"], out["attention_all"][pred])
        assert len(m.classifiers) == c and all(k.out_features == 1 for k in m.classifiers)


def test_mb_has_one_attention_branch_per_class():
    torch.manual_seed(0)
    m = CLAMMB(16, 3, hidden=8, attn_dim=4).eval()
    a = m(torch.randn(20, 16))["attention_all"]
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])


def _record_instance_inputs(m):
    seen = {c: [] for c in range(m.n_classes)}
    for c, clf in enumerate(m.instance_classifiers):
        clf.register_forward_hook(lambda _m, inp, _o, c=c: seen[c].append(inp[0].detach()))
    hs = []
    m.fc.register_forward_hook(lambda _m, _i, o: hs.append(o.detach()))
    return seen, hs


@pytest.mark.parametrize("cls", [CLAMSB, CLAMMB])
@pytest.mark.parametrize("subtyping", [False, True])
@pytest.mark.parametrize("n", [1, 3, 5, 6, 16, 40])
def test_instance_loss_uses_top_and_bottom_min_b_and_n_half(cls, subtyping, n):
    torch.manual_seed(n)
    m = cls(8, 3, hidden=8, attn_dim=4, k_sample=8, subtyping=subtyping).eval()
    seen, hs = _record_instance_inputs(m)
    label = 1
    out = m(torch.randn(n, 8), label=label)
    k = min(8, n // 2)
    h = hs[0]
    scores = out["scores"] if cls is CLAMSB else out["scores_all"]
    scores = scores.expand(3, n) if scores.ndim == 1 else scores
    if k == 0:
        assert out["instance_loss"] == 0
        assert all(not v for v in seen.values())
        return
    # the true class: exactly the top-B (positive) and bottom-B (negative) instances
    (x,) = seen[label]
    order = torch.argsort(scores[label], descending=True)
    assert x.shape == (2 * k, 8)
    assert torch.equal(x, torch.cat([h[order[:k]], h[order[n - k :]]]))
    # other classes: their top-B instances, only with subtyping
    for c in (0, 2):
        if subtyping:
            (x,) = seen[c]
            assert x.shape == (k, 8)
            top = set(torch.topk(scores[c], k).indices.tolist())
            rows = {i for i in range(n) for r in x if torch.equal(h[i], r)}
            assert rows == top
        else:
            assert seen[c] == []


def test_instance_loss_gradient_reaches_only_the_chosen_instances():
    torch.manual_seed(0)
    m = CLAMSB(8, 2, hidden=8, attn_dim=4, k_sample=2, dropout=0.0).eval()
    bag = torch.randn(10, 8)
    h = m.fc(bag).detach().requires_grad_(True)
    scores = m.attention(h).detach()
    m.instance_loss(h, scores, 1).backward()
    used = (h.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    order = torch.argsort(scores, descending=True).tolist()
    assert sorted(used) == sorted(order[:2] + order[-2:])


def test_instance_loss_with_subtyping_is_averaged_over_classes():
    torch.manual_seed(0)
    plain = CLAMMB(8, 3, hidden=8, attn_dim=4, k_sample=2).eval()
    sub = CLAMMB(8, 3, hidden=8, attn_dim=4, k_sample=2, subtyping=True).eval()
    sub.load_state_dict(plain.state_dict())
    bag = torch.randn(12, 8)
    h, scores = plain.fc(bag), plain.attention(plain.fc(bag))
    in_class = plain.instance_loss(h, scores, 0)
    out_terms = []
    for c in (1, 2):
        top = torch.topk(scores[c], 2).indices
        logits = plain.instance_classifiers[c](h[top])
        out_terms.append(
            torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
        )
    expected = (in_class + sum(out_terms)) / 3
    assert torch.isclose(sub.instance_loss(h, scores, 0), expected)


@pytest.mark.parametrize("cls", [CLAMSB, CLAMMB])
def test_bad_bags_and_labels_are_errors(cls):
    m = cls(16, 2)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        m(torch.randn(5, 15))
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        m(torch.randn(16))
    with pytest.raises(ValueError, match=r"empty bag.*\[N, 16\]"):
        m(torch.zeros(0, 16))
    with pytest.raises(ValueError, match="label 2 out of range"):
        m(torch.randn(5, 16), label=2)
    with pytest.raises(ValueError, match="instance_loss"):
        cls(16, 2, instance_loss="hinge")
    with pytest.raises(ValueError, match="at least 2 classes"):
        cls(16, 1)


def test_smooth_svm_values_and_gradient():
    y = torch.tensor([0])
    big = smooth_top1_svm(torch.tensor([[10.0, 0.0]]), y)  # log(1 + e^-9)
    equal = smooth_top1_svm(torch.tensor([[0.0, 0.0]]), y)
    wrong = smooth_top1_svm(torch.tensor([[0.0, 5.0]]), y)
    assert 0 < big < 2e-4
    assert smooth_top1_svm(torch.tensor([[40.0, 0.0]]), y) < 1e-12
    assert math.isclose(equal.item(), math.log(1 + math.e), rel_tol=1e-6)  # tau log(1+e^alpha)
    assert math.isclose(wrong.item(), math.log(1 + math.exp(6)), rel_tol=1e-6)
    assert big < equal < wrong
    # K = 2 closed form tau * log(1 + exp((alpha - d) / tau)), d = s_y - s_other; batch mean
    s = torch.randn(50, 2)
    t = torch.randint(0, 2, (50,))
    d = s.gather(1, t[:, None]).squeeze(1) - s.gather(1, 1 - t[:, None]).squeeze(1)
    assert torch.isclose(smooth_top1_svm(s, t), torch.nn.functional.softplus(1 - d).mean())
    # tends to the hinge max(0, alpha + s_other - s_y) as tau -> 0
    hinge = torch.clamp(1 - d, min=0).mean()
    assert torch.isclose(smooth_top1_svm(s, t, tau=1e-3), hinge, atol=1e-3)
    # differentiable: pushes the true score up and the other down
    x = torch.tensor([[0.5, 0.2]], requires_grad=True)
    smooth_top1_svm(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 0] < 0 < x.grad[0, 1]
    # no overflow for huge scores
    assert torch.isfinite(smooth_top1_svm(torch.tensor([[0.0, 1e4]]), y))


@pytest.mark.parametrize("cls", [CLAMSB, CLAMMB])
def test_model_with_svm_instance_loss(cls):
    torch.manual_seed(0)
    m = cls(8, 2, hidden=8, attn_dim=4, instance_loss="svm")
    out = m(torch.randn(30, 8), label=0)
    out["instance_loss"].backward()
    assert out["instance_loss"] > 0
    assert m.instance_classifiers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["clam_sb", "clam_mb"])
def test_build_clam_follows_config(kind):
    cfg = TrainMilParams(model=kind, instance_loss="svm", subtyping=True, hidden=16, attn_dim=8)
    m = build_clam(12, 3, cfg)
    assert type(m) is KINDS[kind]
    assert m.config() == {
        "model": kind,
        "in_dim": 12,
        "n_classes": 3,
        "hidden": 16,
        "attn_dim": 8,
        "dropout": cfg.dropout,
        "k_sample": cfg.k_sample,
        "instance_loss": "svm",
        "subtyping": True,
    }


@pytest.mark.parametrize("kind", ["clam_sb", "clam_mb"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    cfg = TrainMilParams(model=kind, instance_loss="svm", subtyping=True, hidden=16, attn_dim=8)
    m = build_clam(12, 3, cfg).eval()
    save_clam(tmp_path / "m.pt", m, {"fold": 0})
    back = load_clam(tmp_path / "m.pt")
    assert type(back) is type(m) and back.config() == m.config() and not back.training
    bag = torch.randn(25, 12)
    with torch.no_grad():
        a, b = m(bag, label=1), back(bag, label=1)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_old_checkpoints_without_model_kind_load_as_sb(tmp_path):
    m = CLAMSB(12, 2, hidden=8, attn_dim=4).eval()
    cfg = {k: v for k, v in m.config().items() if k not in ("model", "instance_loss", "subtyping")}
    torch.save(
        {"format": "efcm.clam/1", "config": cfg, "state_dict": m.state_dict()}, tmp_path / "m.pt"
    )
    back = load_clam(tmp_path / "m.pt")
    assert type(back) is CLAMSB and back.instance_loss_kind == "ce" and not back.subtyping
    bag = torch.randn(9, 12)
    assert torch.equal(m(bag)["probs"], back(bag)["probs"])
    cfg["model"] = "clam_xx"
    torch.save({"format": "efcm.clam/1", "config": cfg, "state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown CLAM model 'clam_xx'"):
        load_clam(tmp_path / "x.pt")


@pytest.mark.parametrize(("loss", "subtyping"), [("ce", False), ("svm", True)])
def test_mb_learns_a_class_dependent_shift_with_three_classes(loss, subtyping):
    rng = np.random.default_rng(0)
    bags, labels = {}, {}
    for i in range(48):
        y = i % 3
        x = rng.normal(0, 1, (40, 16)).astype(np.float32)
        if y:  # a few instances shifted along a class-specific direction
            x[:8, 8 * (y - 1) : 8 * y] += 2.0
        bags[f"b{i:02d}"], labels[f"b{i:02d}"] = torch.from_numpy(x), y
    ids = sorted(bags)
    cfg = TrainMilParams(
        model="clam_mb",
        instance_loss=loss,
        subtyping=subtyping,
        epochs=15,
        min_epochs=15,
        lr=1e-3,
        hidden=16,
        attn_dim=8,
    )
    model, info = train_fold(bags, labels, ids[:30], ids[30:36], 3, cfg, seed=0)
    assert isinstance(model, CLAMMB) and info["best_epoch"] >= 1
    test = ids[36:]
    with torch.no_grad():
        pred = [int(model(bags[s])["probs"].argmax()) for s in test]
    acc = np.mean([p == labels[s] for p, s in zip(pred, test, strict=True)])
    assert acc >= 0.9, acc
