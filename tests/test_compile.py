"""`--compile`: a tiny Adventurer and a tiny ARM classifier compile without graph breaks and match eager."""
import copy
import importlib
import sys

import pytest
import torch
from conftest import ROOT
from torch._dynamo.utils import counters

import models_adventurer
import models_arm
from advarm import utils

TINY = {  # both flip variants of the Adventurer block; ARM's four-direction mixer
    "adventurer": lambda: models_adventurer.Adventurer(img_size=32, patch_size=8, depth=2, embed_dim=64,
                                                       num_classes=5, flip_rule="every_two", drop_path_rate=0.0),
    "arm": lambda: models_arm.ARM(img_size=32, patch_size=8, depth=1, embed_dim=32, num_classes=5,
                                  drop_path_rate=0.0),
}


def loss_and_grads(model, images):
    loss = model(images).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow  # inductor compiles a forward and a backward graph per model (about 20 s each on 2 cores)
@pytest.mark.parametrize("family", TINY)
def test_compiled_model_has_no_graph_break_and_matches_eager(family):
    torch.manual_seed(0)
    model = TINY[family]()
    eager = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    counters.clear()
    assert utils.compile_model(model, True) is model
    loss, grads = loss_and_grads(model, images)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph: nothing fell back to eager
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    eager_loss, eager_grads = loss_and_grads(eager, images)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("script", ["main", "main_pretrain", "main_finetune"])
def test_every_training_script_has_the_compile_flag(script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "Finetuning"))
    module = sys.modules.get(script) or importlib.import_module(script)
    parser = module.get_args_parser()
    assert parser.parse_args(["--compile"]).compile is True and parser.parse_args([]).compile is False
