"""An exception becomes one line that keeps what names the file or key."""

from __future__ import annotations

from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from seit.utils.errors import one_line


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test looks at whatever came out
        return e
    raise AssertionError("nothing raised")


def test_an_omegaconf_error_keeps_its_message_and_key():
    cfg = OmegaConf.create({"tokenizer": {"kind": "vq"}})
    OmegaConf.set_struct(cfg, True)
    e = raised(lambda: cfg.tokenizer.model)
    assert isinstance(e, ConfigAttributeError)
    assert one_line(e) == "Key 'model' is not in struct (key tokenizer.model)"


def test_hydra_error_and_its_cause_share_the_line():
    def compose():
        try:
            raised_from = OmegaConf.create({})
            OmegaConf.set_struct(raised_from, True)
            raised_from.foo = 1
        except ConfigAttributeError as cause:
            raise ConfigCompositionException("Could not override 'foo'.\nTo append to your config use +foo=1") from cause

    line = one_line(raised(compose))
    assert "\n" not in line
    assert line.startswith("Could not override 'foo'. To append to your config use +foo=1: Key 'foo' is not in struct")


def test_expected_errors_read_as_their_message_others_also_name_their_type():
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/y.ckpt")) == \
        "[Errno 2] No such file or directory: '/x/y.ckpt'"
    assert one_line(KeyError("data.root is missing")) == "data.root is missing"
    assert one_line(RuntimeError("boom\nmore")) == "RuntimeError: boom more (HYDRA_FULL_ERROR=1 shows the traceback)"


def test_an_override_of_a_renamed_key_names_its_new_name():
    def compose():
        try:
            raised_from = OmegaConf.create({"tokenizer": {}})
            OmegaConf.set_struct(raised_from, True)
            raised_from.tokenizer.embed_dim = 8
        except ConfigAttributeError as cause:
            raise ConfigCompositionException("Could not override 'tokenizer.embed_dim'.\nTo append to your config use "
                                             "+tokenizer.embed_dim=8") from cause

    line = one_line(raised(compose))
    assert line.startswith("tokenizer.embed_dim is now tokenizer.codebook_dim (the codebook's width D")
    assert line.endswith("pass tokenizer.codebook_dim=8")
