"""The user-error mechanism: one base class for every user error, and message helpers that stay short."""
import yaml

from med3dinsight_plugin.errors import Med3DInsightError, first_line, short_repr


def test_every_package_error_class_is_a_user_error():
    from med3dinsight_plugin.checkpoint import CheckpointError
    from med3dinsight_plugin.distributed import DeviceError
    from med3dinsight_plugin.loading import IncompatibleCheckpointError
    from med3dinsight_plugin.pretrain.config import ConfigError
    from med3dinsight_plugin.pretrain.engine import NonFiniteError
    from med3dinsight_plugin.pretrain.run import RunLockedError
    from med3dinsight_plugin.teacher.cache import CacheError, StaleCacheError
    from med3dinsight_plugin.teacher.captioner import VLMError
    from med3dinsight_plugin.teacher.captions import CaptionError
    from med3dinsight_plugin.teacher.clip import TeacherError
    from med3dinsight_plugin.volumes import VolumeError

    for cls in (CheckpointError, IncompatibleCheckpointError, ConfigError, CacheError, StaleCacheError, VLMError,
                CaptionError, TeacherError, VolumeError, DeviceError, NonFiniteError, RunLockedError):
        assert issubclass(cls, Med3DInsightError) and issubclass(cls, ValueError), cls


def test_first_line():
    assert first_line(Med3DInsightError("a.nii.gz: broken; re-export it\nreport follows")) == \
        "a.nii.gz: broken; re-export it"
    assert first_line(OSError()) == "OSError"


def test_short_repr_never_expands_a_billion_laughs():
    doc = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    value = yaml.safe_load(doc)["i"]  # 10^9 leaves once expanded; shared lists, so cheap to hold
    text = short_repr(value, 60)
    assert len(text) <= 60 and text.startswith("[[[[") and text.endswith("...")
    assert short_repr({"lr": 0.1}) == "{'lr': 0.1}"
    assert short_repr("x" * 500, 20) == "'" + "x" * 16 + "..."
