"""engine.py: the shared training/evaluation loop on tiny linear models (CPU, fp32)."""
import math
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine


def _data(n=16, features=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _train(model, loader, lr=0.1, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    stats = engine.train_one_epoch(model, nn.CrossEntropyLoss(), loader, optimizer, torch.device("cpu"), 0,
                                   print_freq=1000, **kwargs)
    return optimizer, stats


def _official_lr(t, lr, min_lr, warmup_epochs, epochs):
    """ARM/MAE `adjust_learning_rate` at fractional epoch t (SPEC 7.2), written out as the reference."""
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("epochs, warmup, iters, lr, min_lr", [
    (100, 5, 50, 2e-3, 1e-6),      # ARM finetuning recipe, layer decay 0.65
    (1600, 40, 3, 1.2e-3, 0.0),    # ARM pretraining recipe
    (12, 0, 7, 1e-3, 0.0),         # no warmup
])
def test_cosine_per_iteration_is_the_official_schedule_with_lr_scale(epochs, warmup, iters, lr, min_lr):
    scales = [0.65 ** k for k in range(3, -1, -1)]
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in scales], lr=lr)
    scheduler = engine.cosine_per_iteration(optimizer, warmup, epochs, iters, min_lr=min_lr)
    worst = 0.0
    for epoch in range(epochs):
        for it in range(iters):
            scheduler.step_update(epoch * iters + it)
            expected = _official_lr(epoch + it / iters, lr, min_lr, warmup, epochs)
            worst = max(worst, *(abs(g["lr"] - expected * s) for g, s in zip(optimizer.param_groups, scales)))
    assert worst < 1e-15
    assert optimizer.param_groups[-1]["lr"] < lr * 1e-3 + min_lr  # the cosine really reached its floor


def test_one_epoch_lowers_the_loss_and_reports_meters():
    model, loader = _linear(), DataLoader(_data(64), batch_size=8)
    before = engine.evaluate(loader, model, torch.device("cpu"), print_freq=1000)["loss"]
    for _ in range(5):
        _, stats = _train(model, loader, lr=0.5)
    after = engine.evaluate(loader, model, torch.device("cpu"), print_freq=1000)["loss"]
    assert set(stats) >= {"loss", "lr"}
    assert stats["lr"] == pytest.approx(0.5)
    assert after < before - 0.05


def test_accumulation_matches_a_large_batch():
    data = _data(16)
    big, accumulated = _linear(), _linear()
    _train(big, DataLoader(data, batch_size=8))
    _train(accumulated, DataLoader(data, batch_size=4), accum_iter=2)
    for p_big, p_acc in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p_big, p_acc, rtol=1e-5, atol=1e-6)


def test_native_scaler_gives_the_same_update_as_plain_backward():
    from timm.utils import NativeScaler

    data = DataLoader(_data(16), batch_size=4)
    plain, scaled = _linear(), _linear()
    _train(plain, data, clip_grad=0.05)
    _train(scaled, data, clip_grad=0.05, loss_scaler=NativeScaler(device="cpu"))
    for p_plain, p_scaled in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p_plain, p_scaled, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_each_update():
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    huge = TensorDataset(torch.full((4, 4), 1e4), torch.zeros(4, dtype=torch.long))
    _train(model, DataLoader(huge, batch_size=4), lr=1.0, clip_grad=0.1)
    step = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    assert step.norm() == pytest.approx(0.1, rel=1e-4)


def test_loss_returning_model_lr_schedule_and_ema_cadence():
    class TokenLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (self.scale * x).pow(2).mean(dim=-1)  # one loss per sample, like ARM's per-token vector

    class CountingEma:
        updates = 0

        def update(self, model):
            self.updates += 1

    model, ema, calls, logged = TokenLoss(), CountingEma(), [], []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=2)  # 12 iterations, no labels
    stats = engine.train_one_epoch(model, None, loader, optimizer, torch.device("cpu"), 3, accum_iter=4,
                                   model_ema=ema, lr_scheduler=types.SimpleNamespace(step_update=calls.append),
                                   log_writer=types.SimpleNamespace(log_step=lambda m, step: logged.append((step, m))),
                                   print_freq=1000)
    assert calls == [36, 40, 44]  # iterations done before each accumulation window (epoch 3 x 12 + ...)
    assert [step for step, _ in logged] == [40, 44, 48]  # iterations done after each optimiser update
    assert all(set(m) == {"train/loss_step", "train/lr"} and m["train/lr"] == 0.01 for _, m in logged)
    assert ema.updates == 3
    assert model.scale.item() < 1.0
    assert math.isfinite(stats["loss"])


def test_layer_scaled_lr_multiplies_once_and_max_iters_truncates():
    model = _linear()
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_scale": 0.25}, {"params": [model.bias]}], lr=0.2)
    seen = []
    loader = DataLoader(_data(32), batch_size=4)
    engine.train_one_epoch(model, nn.CrossEntropyLoss(), loader, optimizer, torch.device("cpu"), 0,
                           layer_scaled_lr=True, max_iters=3, start_step=10, print_freq=1000,
                           lr_scheduler=types.SimpleNamespace(step_update=seen.append))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.2])
    assert seen == [10, 11, 12]


def test_mixup_and_bce_targets_reach_the_criterion():
    received = []

    def criterion(outputs, targets):
        received.append(targets)
        return outputs.sum() * 0

    def mixup(x, y):
        return x, torch.nn.functional.one_hot(y, 3).float() * 0.7 + 0.1

    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.train_one_epoch(model, criterion, DataLoader(_data(8), batch_size=4), optimizer, torch.device("cpu"), 0,
                           mixup_fn=mixup, bce_targets=True, print_freq=1000)
    assert len(received) == 2 and all(torch.equal(t, torch.ones(4, 3)) for t in received)


def test_non_finite_loss_stops_with_a_clear_message():
    model = _linear()
    bad = TensorDataset(torch.full((4, 4), float("nan")), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SystemExit, match="loss is nan at epoch 0, iteration 3: stopping .*--skip-nonfinite N"):
        _train(model, DataLoader(bad, batch_size=4), first_step=3)


def test_skip_nonfinite_skips_and_counts_within_its_budget():
    data = _data(12)
    data.tensors[0][4:8] = float("nan")  # the second of three batches
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, stats = _train(model, DataLoader(data, batch_size=4), skip_nonfinite=1)
    assert stats["nonfinite_skipped"] == 1 and math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the other two steps ran
    data.tensors[0][8:] = float("nan")
    with pytest.raises(SystemExit, match="iteration 2"):  # the second non-finite step is over the budget
        _train(_linear(), DataLoader(data, batch_size=4), skip_nonfinite=1)


def test_evaluate_reports_exact_top1_top5_and_loss():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [0, 1, 5.0, 0, 0, 0], [1, 0, 0, 5.0, 0, 0]])
    target = torch.tensor([0, 2, 2, 5])  # right, second best, right, tied with three others
    loader = DataLoader(TensorDataset(logits, target), batch_size=2)
    stats = engine.evaluate(loader, Fixed(), torch.device("cpu"), print_freq=1000)
    assert stats["acc1"] == pytest.approx(50.0)
    expected_loss = (nn.functional.cross_entropy(logits[:2], target[:2]) +
                     nn.functional.cross_entropy(logits[2:], target[2:])) / 2
    assert stats["loss"] == pytest.approx(expected_loss.item(), rel=1e-6)
    top5 = logits.topk(5).indices.eq(target[:, None]).any(1).float().mean() * 100
    assert stats["acc5"] == pytest.approx(top5.item())


def test_evaluate_under_bf16_autocast_runs_on_cpu():
    model = _linear()
    stats = engine.evaluate(DataLoader(_data(8), batch_size=4), model, torch.device("cpu"),
                            amp_dtype=torch.bfloat16, print_freq=1000)
    assert 0.0 <= stats["acc1"] <= 100.0 and math.isfinite(stats["loss"])
