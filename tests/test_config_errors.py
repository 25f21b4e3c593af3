"""Bad configuration fails before training, naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from rectrain.errors import ConfigError
from rectrain.training import build, build_net_and_task
from tests.conftest import ROOT, TINY_DATA


def _build(cfg):
    dm = build(cfg.data)
    dm.setup()
    return build_net_and_task(cfg, dm)


def test_unknown_key_is_rejected_by_hydra(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="model.not_a_key"):
        compose_cfg("model.not_a_key=3")


@pytest.mark.parametrize("override, key", [
    ("model.dim=abc", "model.net.dim"),
    ("model.net.layers=[64,x]", "model.net.layers"),
    ("model.ks=ten", "model.ks"),
    ("+model.net.depth=3", "model.net.depth"),
])
def test_wrong_type_or_unknown_argument_names_the_key(compose_cfg, override, key):
    cfg = compose_cfg("model=mlp", *TINY_DATA, override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _build(cfg)


def test_bad_data_settings_name_the_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"data\.split\.kind"):
        build(compose_cfg(*TINY_DATA, "data.split.kind=random").data).setup()
    with pytest.raises(ConfigError, match=r"data\.preprocess\.dedup"):
        build(compose_cfg(*TINY_DATA, "data.preprocess.dedup=maybe").data).setup()
    with pytest.raises(ConfigError, match=r"model\.loss"):
        _build(compose_cfg(*TINY_DATA, "model.loss=hinge"))


def test_train_py_exits_2_with_one_line_for_bad_input(tmp_path):
    log = tmp_path / "empty.csv"
    log.write_text("")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=interactions", f"data.source.path={log}",
         f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "empty.csv" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["model=two_tower", "model.net.cell=rnn"], "'model.net.cell': must be one of ['gru', 'lstm', 'transformer']"),
    (["model=two_tower", "model.net.repeat_mode=max"], "'model.net.repeat_mode': must be one of ['bonus', 'mixture']"),
    (["model=two_tower", "model.loss=bce"], "'model.loss': must be one of ['full', 'sampled', 'bpr_max']"),
    (["model=two_tower", "model.positions=first"], "'model.positions': must be one of ['all', 'last']"),
    (["model=mf", "model.loss=hinge"], "'model.loss': must be one of ['bce', 'bpr']"),
    (["privacy=dp", "privacy.accountant=gdp"], "'privacy.accountant': must be one of ['rdp', 'prv']"),
])
def test_choices_are_checked_with_the_config_before_data(compose_cfg, overrides, message):
    from rectrain.training import check_config

    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert message in str(caught.value)


def test_a_bad_choice_fails_training_before_any_data_is_read(compose_cfg, tmp_path):
    """train() checks the config first; train.py turns the ConfigError into one line and exit 2
    (test_train_py_exits_2_with_one_line_for_bad_input runs that path as a subprocess)."""
    from rectrain.training import train

    cfg = compose_cfg("model=two_tower", "model.net.cell=rnn", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"'model\.net\.cell': must be one of \['gru', 'lstm', 'transformer'\], "
                                          r"got 'rnn'"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # the data was never prepared
