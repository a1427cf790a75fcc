"""The one configuration reader: env > configs/base.yaml > defaults; bad values are errors."""
import pytest
import torch

from nsa_ext.config import REPO_CONFIG, ConfigError, Settings, load_settings


def test_repo_yaml_is_read_without_env():
    s = load_settings({})
    assert s.source == str(REPO_CONFIG)
    assert s.from_env == ()


def test_env_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  sel_triton_min_L: 512\n  use_triton_sel: false\n")
    s = load_settings({"NSA_CONFIG": str(cfg)})
    assert (s.sel_triton_min_L, s.use_triton_sel) == (512, False)
    s = load_settings({"NSA_CONFIG": str(cfg), "NSA_SEL_TRITON_MIN_L": "64", "NSA_USE_TRITON_SEL": "1"})
    assert (s.sel_triton_min_L, s.use_triton_sel) == (64, True)
    assert set(s.from_env) == {"sel_triton_min_L", "use_triton_sel"}


def test_defaults_fill_what_yaml_lacks(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime: {}\n")
    s = load_settings({"NSA_CONFIG": str(cfg)})
    assert s.sel_triton_group == Settings().sel_triton_group
    assert s.sdpa_gather_budget_mb == Settings().sdpa_gather_budget_mb


@pytest.mark.parametrize("var,value", [("NSA_SEL_TRITON_MIN_L", "abc"), ("NSA_SEL_TRITON_MIN_L", "-3"),
                                       ("NSA_USE_TRITON_SEL", "maybe"), ("NSA_DEBUG_LOG", "2"),
                                       ("NSA_SDPA_GATHER_BUDGET_MB", "1.5"),
                                       ("NSA_SEL_TILE_MAX_CTAS", "-1")])
def test_bad_env_value_names_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        load_settings({var: value})


def test_tile_grid_cap_is_read_from_env():
    assert load_settings({}).sel_tile_max_ctas == 0
    assert load_settings({"NSA_SEL_TILE_MAX_CTAS": "7"}).sel_tile_max_ctas == 7


def test_bad_yaml_value_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  sel_triton_min_L: lots\n")
    with pytest.raises(ConfigError, match="runtime.sel_triton_min_L"):
        load_settings({"NSA_CONFIG": str(cfg)})


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="NSA_CONFIG"):
        load_settings({"NSA_CONFIG": str(tmp_path / "nope.yaml")})


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False),
                                            ("false", False), ("", False)])
def test_bool_spellings(value, expected):
    assert load_settings({"NSA_DEBUG_LOG": value}).debug_log is expected


def test_measured_thresholds_are_per_architecture(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  sel_triton_min_L: 100\n  thresholds:\n"
                   "    sm90: {sel_triton_min_L: 256, sel_cuda_min_L: 128}\n")
    s = load_settings({"NSA_CONFIG": str(cfg)})
    assert s.min_len("triton", "sm90") == 256
    assert s.min_len("cuda", "sm90") == 128
    assert s.min_len("triton", "sm89") == 100      # an H100's numbers don't decide for a 4090
    assert s.min_len("triton", None) == 100
    # An explicit environment variable still wins over a measured threshold.
    s = load_settings({"NSA_CONFIG": str(cfg), "NSA_SEL_TRITON_MIN_L": "7"})
    assert s.min_len("triton", "sm90") == 7


def test_cached_settings_see_a_changed_env_flag_at_once(monkeypatch):
    monkeypatch.delenv("NSA_DEBUG_LOG", raising=False)
    assert load_settings() is load_settings()            # the common path is a cache hit
    assert not load_settings().debug_log
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")
    assert load_settings().debug_log
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", "123")
    assert load_settings().sel_triton_min_L == 123
    monkeypatch.delenv("NSA_SEL_TRITON_MIN_L")
    assert "sel_triton_min_L" not in load_settings().from_env


def test_cached_settings_see_an_edited_yaml_file(tmp_path, monkeypatch):
    import os

    from nsa_ext import config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  sel_triton_min_L: 100\n")
    monkeypatch.setenv("NSA_CONFIG", str(cfg))
    assert load_settings().sel_triton_min_L == 100
    cfg.write_text("runtime:\n  sel_triton_min_L: 200\n")
    stat = cfg.stat()
    os.utime(cfg, (stat.st_atime, stat.st_mtime + 5))   # a later mtime, whatever the clock
    monkeypatch.setattr(config, "_RECHECK_FILE_S", 0.0)  # the file is re-checked every call
    assert load_settings().sel_triton_min_L == 200


def test_on_device_is_a_no_op_off_cuda():
    import contextlib

    from nsa_ext.device import on_device

    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(on_device(torch.device("meta")), contextlib.nullcontext)
