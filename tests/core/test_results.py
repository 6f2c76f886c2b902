"""The typed results of the pipeline functions (#15 item 7): documented fields, to_dict, deprecated dict access."""
import dataclasses
import inspect
import json
import re
import warnings

import pytest

from med3dinsight_plugin.export import ExportResult, export_checkpoint
from med3dinsight_plugin.loading import LoadReport
from med3dinsight_plugin.pretrain import PretrainResult, pretrain, run_pretraining
from med3dinsight_plugin.results import Result
from med3dinsight_plugin.teacher.captioner import CaptionResult, caption_dataset
from med3dinsight_plugin.teacher.embed import EmbedResult, embed_dataset
from med3dinsight_plugin.teacher.label_captions import LabelCaptionResult, caption_from_labels
from nnunet_trainers.attach import AttachResult, attach_checkpoint

RETURNS = [(caption_dataset, CaptionResult), (caption_from_labels, LabelCaptionResult), (embed_dataset, EmbedResult),
           (pretrain, PretrainResult), (run_pretraining, PretrainResult), (export_checkpoint, ExportResult),
           (attach_checkpoint, AttachResult)]


def _returns_section(doc: str) -> str:
    return doc.split("Returns:", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("function, cls", RETURNS, ids=[f.__name__ for f, _ in RETURNS])
def test_each_function_returns_its_result_and_documents_every_field(function, cls):
    assert inspect.signature(function).return_annotation in (cls, cls.__name__)
    assert issubclass(cls, Result) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    attributes = cls.__doc__.split("Attributes:", 1)[1]
    returns = _returns_section(inspect.getdoc(function))
    assert cls.__name__ in returns
    for field in dataclasses.fields(cls):
        assert re.search(rf"^\s+(\w+, )*{field.name}\b[\w, ]*:", attributes, re.M), f"{cls.__name__}.{field.name}"
        assert f"``{field.name}``" in returns, f"{function.__name__}'s Returns lacks {field.name}"
    named = set(re.findall(r"``(\w+)``", returns))  # no key promised that the result does not have
    assert named - {f.name for f in dataclasses.fields(cls)} <= {"None", "NAME", "nnUNetv2_train"}, named


def _pretrain_result():
    return PretrainResult(checkpoint="run/med3dinsight.safetensors", state="run/checkpoints/last.pt", output="run",
                          steps=4, start_step=2, global_batch=8, losses={"loss": 1.5})


def test_to_dict_is_plain_json():
    assert _pretrain_result().to_dict() == {
        "checkpoint": "run/med3dinsight.safetensors", "state": "run/checkpoints/last.pt", "output": "run",
        "steps": 4, "start_step": 2, "global_batch": 8, "losses": {"loss": 1.5}, "eval": {}}
    report = LoadReport(source="a", source_format="med3dinsight", target="PlainConvUNet", key_mapping="identity",
                        expected=2, loaded=2, mismatched={"w": ((1, 2), (3, 4))})
    attached = AttachResult(plans_file="p.json", plans_name="p", trainer="T", command="nnUNetv2_train", report=report,
                            changes=["patch size"])
    d = json.loads(json.dumps(attached.to_dict()))
    assert d["report"] == json.loads(json.dumps(report.to_dict())) and d["report"]["coverage"] == 100.0
    assert d["changes"] == ["patch size"] and d["replaced"] is False


def test_results_are_frozen_and_read_as_attributes():
    r = _pretrain_result()
    assert r.checkpoint.endswith(".safetensors") and r.eval == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = 5
    with pytest.raises(TypeError):
        iter(r)  # not a mapping: no silent iteration through __getitem__


def test_dict_style_access_still_works_but_warns():
    r = _pretrain_result()
    with pytest.warns(DeprecationWarning, match=r"PretrainResult like a dict \(\['steps'\]\).*\.steps"):
        assert r["steps"] == 4
    with pytest.warns(DeprecationWarning, match="get"):
        assert r.get("eval") == {} and r.get("nothing", 7) == 7
    with pytest.warns(DeprecationWarning):
        assert "losses" in r and "nothing" not in r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(KeyError):
            r["nothing"]
        with pytest.raises(KeyError):
            r[0]
