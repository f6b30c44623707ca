"""One contract for the three bundles, in the spirit of the Model Zoo's ``verify_bundle.py``.

Per bundle: ``verify_metadata`` against the local schema, ``ConfigWorkflow.check_properties()`` for
train, infer and eval, and the network's input/output shapes against ``metadata.json``. Across the
bundles: the blocks meant to be shared (multi-GPU overrides, logging, optimiser, scheduler, trainer,
evaluator, checkpointing, ETTA/TTA settings) are identical, or come from one source.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {name: REPO / "bundles" / f"swin_bob_{name}" for name in ("btcv", "brats", "ukbob")}
#: test sizes: feature_size 12, 64^3 windows, coarse voxels, nothing cached
TINY = {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1,
        "num_workers": 0, "cache_rate": 0.0}
EXTRA = {"ukbob": {"use_solf": False}}  # SOLF's decisions come from solf.json (tested in test_bundle_ukbob.py)
WORKFLOWS = {"train": ("train.json",), "infer": ("inference.json",), "eval": ("train.json", "evaluate.json")}

#: config ids whose content is the same in every bundle (bundle-specific values are references)
SHARED = {
    "train.json": [
        "bundle_root", "ckpt_dir", "device", "amp", "is_main_process", "padding_mode", "pretrained_ckpt", "resume", "val_interval",
        "ckpt_interval", "warmup_epochs", "learning_rate", "weight_decay", "network", "optimizer", "lr_scheduler",
        "train#dataset", "train#dataloader", "train#inferer", "train#handlers", "train#trainer",
        "train#checkpoint_saver", "train#checkpoint_loader", "validate#preprocessing", "validate#dataset",
        "validate#dataloader", "validate#postprocessing", "validate#handlers", "validate#evaluator", "initialize", "run",
    ],
    "evaluate.json": ["use_etta", "use_tta", "output_dir", "eval_datalist", "validate#dataset", "tta_inferer#inferer",
                      "tta_inferer#activation", "validate#evaluator#inferer", "initialize", "run"],
    "inference.json": ["bundle_root", "ckpt_dir", "output_dir", "output_type", "input_path", "datalist",
                       "screened_datalist", "device", "amp", "network", "dataset", "dataloader", "use_etta", "use_tta",
                       "displayable_configs", "tta_inferer#inferer", "tta_inferer#activation", "inferer", "handlers",
                       "evaluator", "initialize", "run"],
}
#: what a bundle may set on EntropyTTAInferer: the window, the buffers' dtype and the output activation;
#: the method's settings (steps, lr, tau, ...) are the defaults of custom.etta.EntropyTTAInferer, in one place
ETTA_BUNDLE_ARGS = {"_target_", "roi_size", "sw_batch_size", "overlap", "mode", "padding_mode", "buffer_dtype", "activation"}


def _eval_properties(folder: Path) -> Path:
    """MONAI's inference properties with the engine ids under ``validate#``, where train.json + evaluate.json
    keep the evaluator (as the zoo's evaluate.json files do): a ``properties_path`` file for ConfigWorkflow.

    Top-level aliases (``evaluator: @validate#evaluator``) would pass the check but break MONAI's
    ``--tracking``, which patches ``evaluator`` in place when it finds it.
    """
    from monai.bundle.properties import InferProperties, MetaProperties

    top = {"bundle_root", "device", "dataset_dir", "network_def"}
    infer = {}
    for name, prop in InferProperties.items():
        prop = {str(k): v for k, v in prop.items()}
        if name not in top:
            prop["id"] = "validate::" + prop["id"]
            if prop.get("refer_id"):
                prop["refer_id"] = "validate::" + prop["refer_id"]
        infer[name] = prop
    path = folder / "eval_properties.json"
    meta = {name: {str(k): v for k, v in prop.items()} for name, prop in MetaProperties.items()}
    path.write_text(json.dumps({"infer": infer, "meta": meta}))
    return path


def _config(bundle: str, name: str) -> dict[str, Any]:
    return json.loads((BUNDLES[bundle] / "configs" / name).read_text())


def _get(config: dict[str, Any], config_id: str) -> Any:
    """``a#b#c`` in a config file: nested keys, or a key that holds ``#`` itself (an override id)."""
    if config_id in config:
        return config[config_id]
    head, _, rest = config_id.partition("#")
    if not rest or head not in config:
        raise KeyError(config_id)
    return _get(config[head], rest)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_verifies_offline(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLES[bundle] / "configs" / "metadata.json"), filepath=str(SCHEMA))  # raises on any error


@pytest.mark.slow
@pytest.mark.parametrize("workflow_type", sorted(WORKFLOWS))
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_config_properties_complete(bundle, workflow_type, request, tmp_path):
    from monai.bundle import ConfigWorkflow

    sample = request.getfixturevalue(f"{bundle}_sample")
    configs = BUNDLES[bundle] / "configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / c) for c in WORKFLOWS[workflow_type]], meta_file=str(configs / "metadata.json"),
        logging_file=False, workflow_type=workflow_type, bundle_root=str(tmp_path), dataset_dir=str(sample),
        properties_path=_eval_properties(tmp_path) if workflow_type == "eval" else None, **TINY, **EXTRA.get(bundle, {}),
    )
    wf.initialize()
    assert wf.check_properties() == []


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_network_in_out_shapes_match_metadata(bundle):
    """``verify_net_in_out``: a tensor of metadata's input shape gives metadata's output shape (tiny width)."""
    from monai.bundle import ConfigParser, verify_net_in_out

    configs = BUNDLES[bundle] / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu", **{"network_def#feature_size": 12})
    meta = json.loads((configs / "metadata.json").read_text())["network_data_format"]
    parser = ConfigParser(_config(bundle, "inference.json"))
    net = parser.get_parsed_content("network_def")
    assert net.out.conv.conv.in_channels == 48 and net.out.conv.conv.out_channels == meta["outputs"]["pred"]["num_channels"]
    assert net.swinViT.patch_embed.proj.in_channels == meta["inputs"]["image"]["num_channels"]


@pytest.mark.parametrize("name", ["multi_gpu_train.json", "multi_gpu_evaluate.json", "multi_gpu_inference.json", "logging.conf"])
def test_multi_gpu_overrides_and_logging_are_identical(name):
    texts = {b: (path / "configs" / name).read_text() for b, path in BUNDLES.items()}
    assert len(set(texts.values())) == 1, f"{name} differs between bundles"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_blocks_are_identical(name):
    configs = {b: _config(b, name) for b in BUNDLES}
    for config_id in SHARED[name]:
        values = {b: json.dumps(_get(c, config_id), sort_keys=True) for b, c in configs.items()}
        assert len(set(values.values())) == 1, f"{name} {config_id} differs: {values}"
    if name == "train.json":  # the shared steps in the same order (a drifted block moves); SOLF adds its own
        for section in ("train", "validate"):
            common = set.intersection(*(set(c[section]) for c in configs.values()))
            assert len({tuple(k for k in c[section] if k in common) for c in configs.values()}) == 1, section


def test_etta_settings_come_from_the_python_defaults():
    from monai.bundle import ConfigParser

    from custom.etta import EntropyTTAInferer

    defaults = {k: p.default for k, p in inspect.signature(EntropyTTAInferer).parameters.items()}
    for bundle in BUNDLES:
        for name in ("inference.json", "evaluate.json"):
            block = _config(bundle, name)["etta_inferer"]
            assert set(block) <= ETTA_BUNDLE_ARGS, f"{bundle} {name} repeats ETTA settings {set(block) - ETTA_BUNDLE_ARGS}"
        parser = ConfigParser(_config(bundle, "inference.json"))
        parser.update(TINY)
        etta = parser.get_parsed_content("etta_inferer")
        for key in ("steps", "lr", "momentum", "tau", "params", "w0_floor"):
            assert getattr(etta, key) == defaults[key], (bundle, key)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_thin_volumes_are_padded_with_their_edge_slices(bundle):
    """An input thinner than a window (a 40 mm CT slab) is padded by replication in every inferer and in train's
    ``SpatialPadd``: a constant 0 is a slab of fat-coloured voxels that no training crop shows."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(_config(bundle, "inference.json"))
    parser.update(TINY)
    for config_id in ("sliding_window_inferer", "etta_inferer", "tta_inferer#inferer"):
        assert parser.get_parsed_content(config_id).padding_mode == "replicate", (bundle, config_id)
    train = ConfigParser(_config(bundle, "train.json"))
    train.update(TINY)
    assert train.get_parsed_content("validate#inferer").padding_mode == "replicate", bundle
    pads = [t for t in train["train"]["deterministic_transforms"] if isinstance(t, dict) and t.get("_target_") == "SpatialPadd"]
    assert [t["mode"] for t in pads] == ["@padding_mode"] and train.get_parsed_content("padding_mode") == "replicate", bundle
    assert _config(bundle, "evaluate.json")["etta_inferer"]["padding_mode"] == "%validate#inferer#padding_mode"


def test_evaluate_reuses_train_loading_and_checks():
    """evaluate.json's pre-processing loads and checks with train's own transforms (macros, one source)."""
    for bundle in BUNDLES:
        transforms = _config(bundle, "evaluate.json")["validate#preprocessing"]["transforms"]
        assert transforms[:4] == [f"%train#deterministic_transforms#{i}" for i in range(4)], bundle
        train = _config(bundle, "train.json")["train"]["deterministic_transforms"]
        assert [t["_target_"] for t in train[:1]] == ["custom.transforms.SafeLoadImaged"]


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_every_import_is_used(bundle):
    """No ``$import`` that nothing in the config family reads (train+evaluate+multi-GPU, inference+multi-GPU)."""
    configs = BUNDLES[bundle] / "configs"
    families = {"train.json": ["train.json", "evaluate.json", "multi_gpu_train.json", "multi_gpu_evaluate.json"],
                "inference.json": ["inference.json", "multi_gpu_inference.json"], "solf.json": ["solf.json"]}
    for name, family in families.items():
        if not (configs / name).exists():
            continue
        imports = json.loads((configs / name).read_text()).get("imports", [])
        text = "\n".join((configs / f).read_text() for f in family)
        text = re.sub(r'"\$import [^"]+"', "", text)
        for statement in imports:
            module = statement.split()[-1]  # "$import torch.distributed as dist" -> dist
            if module == "custom":
                continue
            assert re.search(rf"(?<![\w.]){re.escape(module)}\.", text), f"{bundle} {name}: {statement} is not used"


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_yes_no_switches_are_read_with_config_flag(bundle):
    """Every top-level yes / no setting (``use_etta``, ``resume``, ...) that a ``$`` expression reads goes through
    ``custom.errors.config_flag``: ``--use_etta false`` on the command line is the string "false", which a bare
    ``if @use_etta`` would take as on."""
    configs = sorted((BUNDLES[bundle] / "configs").glob("*.json"))
    flags = {key for f in configs for key, value in json.loads(f.read_text()).items() if isinstance(value, bool)}
    assert {"use_etta", "use_tta", "resume"} <= flags, flags
    read = 0
    for f in configs:
        for expr in re.findall(r'"(\$[^"]*)"', f.read_text()):
            for flag in flags:
                for ref in re.finditer(rf"@(?:displayable_configs#)?{flag}\b", expr):
                    read += 1
                    assert expr[: ref.start()].endswith("custom.errors.config_flag("), f"{f.name}: {expr}"
    assert read >= 5
