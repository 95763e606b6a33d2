"""pytest plugin: run timm's own tests/test_models.py on this project's classifiers only.

Load it with `-p timm_suite_plugin` (this folder and the project root on PYTHONPATH). At import it registers
our models and replaces `timm.list_models`, which test_models.py calls at import to parametrise its tests,
so that every listing holds only our classifiers. They are token-sequence models like ViT (`forward_features`
-> (B, N+1, C)), so a listing gets them exactly where timm lists a ViT: `filter=NON_STD_FILTERS` ('vit_*')
includes them, `exclude_filters=NON_STD_FILTERS` (the CNN-only tests) drops them, `module=FEAT_INTER_FILTERS`
includes them like 'vision_transformer'. Pretrained listings are empty: the weights live on the Hugging Face
hub, which these tests must not download.

Collection keeps the config tests (built on the meta device, so free) for every registered classifier and tag,
and runs the tests that compute (forward, backward, features, intermediates) on REDUCED stand-ins: the
registered factories with 4 layers of 64 channels at 64 px, as timm's own suite uses `test_vit`. A full-size
model costs minutes per test on a 2-core CPU with the torch SSM backend.
"""
import fnmatch

import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

import models_adventurer
import models_arm

REGISTERED = tuple(timm.list_models(module=["models_adventurer", "models_arm"]))
# Real factory, at 64 px with 4 layers of 64 channels: every timm API path of the full model, at 1/1000 the cost.
STANDINS = {
    "test_adventurer": models_adventurer.adventurer_tiny_patch16,
    "test_adventurer_patch8": models_adventurer.adventurer_base_patch8,
    "test_arm": models_arm.arm_base_pz16,
}
STANDIN_ARGS = dict(img_size=64, embed_dim=64, depth=4)
# timm's tests that only build on the meta device; every other selected test runs on the stand-ins only.
META_TESTS = ("test_model_default_cfgs", "test_model_default_cfgs_non_std")
# What timm's filters see in place of our models: a ViT name and ViT's module.
VIT_LIKE_NAME, VIT_LIKE_MODULE = "vit_base_patch16_224", "vision_transformer"


def _standin_cfg(factory):
    """The full model's pretrained cfg at the stand-in size, without weights to download."""
    cfg = get_pretrained_cfg(factory.__name__).to_dict()
    for key in ("architecture", "tag", "url", "hf_hub_id", "hf_hub_filename"):
        cfg.pop(key, None)
    size = STANDIN_ARGS["img_size"]
    return {**cfg, "input_size": (3, size, size)}


default_cfgs = generate_default_cfgs({name: _standin_cfg(factory) for name, factory in STANDINS.items()})


def _register_standin(name, factory):
    def create(pretrained=False, **kwargs):
        kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or get_pretrained_cfg(name)
        return factory(pretrained, **{**STANDIN_ARGS, **kwargs})

    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"{factory.__name__} reduced to {STANDIN_ARGS} (timm test-suite stand-in)."
    register_model(create)


for _name, _factory in STANDINS.items():
    _register_standin(_name, _factory)

_timm_list_models = timm.list_models


def _as_list(value):
    """timm accepts a pattern or a list of them; '' means none."""
    return [v for v in ([value] if isinstance(value, str) else value or ()) if v]


def list_project_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                        include_tags=None):
    """`timm.list_models` restricted to our classifiers and stand-ins, each filtered as if it were a ViT."""
    modules, filters, excludes = _as_list(module), _as_list(filter), _as_list(exclude_filters)
    if pretrained or (modules and VIT_LIKE_MODULE not in modules):
        return []
    if filters and not any(fnmatch.fnmatch(VIT_LIKE_NAME, f) for f in filters):
        return []
    if any(fnmatch.fnmatch(VIT_LIKE_NAME, f) for f in excludes):
        return []
    return _timm_list_models([*REGISTERED, *STANDINS], exclude_filters=excludes, name_matches_cfg=name_matches_cfg,
                             include_tags=include_tags)


timm.list_models = list_project_models


def pytest_collection_modifyitems(config, items):
    """Keep the meta-device tests of every classifier and the other tests of the stand-ins; drop the rest
    (timm's tests hard-coded to its own models)."""
    def keep(item):
        name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
        if not isinstance(name, str):
            return False
        architecture = name.split(".")[0]
        return architecture in STANDINS or (architecture in REGISTERED and item.originalname in META_TESTS)

    deselected = [item for item in items if not keep(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if keep(item)]
