"""Hostile and unlucky checkpoint inputs: each ends in one line naming the file (or key) and the fix, exit code 2 on
the command line, nothing half-written, and nothing allocated or executed on the word of the file."""
import json
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import tiny_backbone
from med3dinsight_plugin import (
    CheckpointError,
    build_backbone,
    load_checkpoint,
    load_pretrained_encoder,
    save_pretrained,
)
from med3dinsight_plugin.checkpoint import read_checkpoint_info
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.fileio import storage_id

# ---------------------------------------------------------------------------------------------------------- helpers

def _meta(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["med3dinsight"])


def _rewrite(src, dst, meta=None, change=None):
    """Copy a med3dinsight checkpoint with its metadata replaced and/or its tensors changed."""
    tensors = load_file(str(src))
    if change:
        change(tensors)
    header = json.dumps(_meta(src) if meta is None else meta)
    save_file(tensors, str(dst), metadata={"med3dinsight": header})
    return Path(dst)


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _one_line(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert str(needle) in err[0], err[0]


def _poison(tensors, n=5):
    """NaN and Inf in the first ``n`` floating encoder tensors; returns their names."""
    keys = [k for k, t in tensors.items() if k.startswith("network.encoder.") and t.is_floating_point()][:n]
    for i, key in enumerate(keys):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan") if i % 2 else float("inf")
    return keys


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return save_pretrained(tiny_backbone("plain_conv_unet"), tmp_path_factory.mktemp("plain") / "p.safetensors")


@pytest.fixture
def nnunet_dataset(nnunet_plans, tmp_path, monkeypatch):
    """A private copy of the planned tiny dataset (plans and dataset.json) under a fresh nnUNet_preprocessed."""
    folder = tmp_path / "pre" / nnunet_plans["plain"].parent.name
    shutil.copytree(nnunet_plans["plain"].parent, folder)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    torch.manual_seed(0)
    ckpt = save_pretrained(build_backbone("nnunet", plans=folder / "nnUNetPlans.json"), tmp_path / "pre.safetensors")
    return {"folder": folder, "plans": folder / "nnUNetPlans.json", "ckpt": ckpt, "id": "990"}


def _plans_files(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.json")}


# ------------------------------------------------------------------------- item 3: attach never clobbers plans

@pytest.mark.slow
def test_attach_never_overwrites_the_source_plans(nnunet_dataset, capsys):
    from nnunet_trainers.attach import attach_checkpoint

    d = nnunet_dataset
    before = _plans_files(d["folder"])
    for extra in ([], ["--adapt-architecture"]):
        code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "-p", "nnUNetPlans", "--checkpoint", d["ckpt"],
                            "-n", "nnUNetPlans", *extra)
        _one_line(code, err, "would overwrite the plans it starts from", d["plans"], "choose another name")
    with pytest.raises(Med3DInsightError, match="would overwrite the plans it starts from"):
        attach_checkpoint(d["id"], "nnUNetPlans", d["ckpt"], name="nnUNetPlans", overwrite=True)
    assert _plans_files(d["folder"]) == before


def test_attach_replaces_other_plans_only_with_overwrite(nnunet_dataset, capsys):
    from nnunet_trainers.attach import PLANS_KEY

    d = nnunet_dataset
    handmade = d["folder"] / "handmade.json"
    handmade.write_text(json.dumps({**json.loads(d["plans"].read_text()), "plans_name": "handmade", "mine": 1}))
    before = _plans_files(d["folder"])
    code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", d["ckpt"], "-n", "handmade")
    _one_line(code, err, handmade, "--overwrite")
    # nnU-Net's own plans of another planner are just as safe
    code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", d["ckpt"], "-n",
                        "nnUNetResEncUNetMPlans")
    _one_line(code, err, "nnUNetResEncUNetMPlans.json", "--overwrite")
    assert _plans_files(d["folder"]) == before
    code, out, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", d["ckpt"], "-n", "handmade",
                          "--overwrite")
    assert code == 0 and f"replaced {handmade}" in out, err
    written = json.loads(handmade.read_text())
    assert PLANS_KEY in written and "mine" not in written


def test_reattaching_replaces_the_plans_attach_wrote(nnunet_dataset, capsys, tmp_path):
    from nnunet_trainers.attach import attach_checkpoint

    d = nnunet_dataset
    code, out, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", d["ckpt"])
    assert code == 0, err
    torch.manual_seed(1)
    newer = save_pretrained(build_backbone("nnunet", plans=d["plans"]), tmp_path / "newer.safetensors")
    code, out, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", newer)  # the usual re-run: no flag
    assert code == 0, err
    written = json.loads((d["folder"] / "nnUNetPlans__med3dinsight.json").read_text())
    assert written["med3dinsight"]["checkpoint"] == str(newer.resolve())
    # plans an attach wrote from *other* source plans are not silently replaced
    with pytest.raises(Med3DInsightError, match="not written by nnunet-attach from nnUNetResEncUNetMPlans"):
        attach_checkpoint(d["id"], "nnUNetResEncUNetMPlans", d["ckpt"], name="nnUNetPlans__med3dinsight")


@pytest.mark.parametrize("args,needles", [
    (["-n", "../escaped"], ["must be a plain name"]),
    (["-n", "sub/plans"], ["must be a plain name"]),
    (["-d", "4242"], ["dataset '4242' is not in nnUNet_preprocessed", "nnUNetv2_plan_and_preprocess"]),
    (["-d", "notanumber"], ["dataset 'notanumber' is not in nnUNet_preprocessed"]),
    (["-p", "broken"], ["broken.json is not valid JSON"]),
    (["-p", "nolist"], ["nolist.json is not nnU-Net v2 plans"]),
    (["--no-dataset-json"], ["dataset.json does not exist", "nnUNetv2_plan_and_preprocess"]),
])
def test_attach_bad_arguments_and_dataset_files(nnunet_dataset, capsys, args, needles):
    d = nnunet_dataset
    (d["folder"] / "broken.json").write_text('{"configurations": ')
    (d["folder"] / "nolist.json").write_text('[1, 2]')
    if args == ["--no-dataset-json"]:
        (d["folder"] / "dataset.json").unlink()
        args = []
    cmd = {"-d": d["id"], "--checkpoint": str(d["ckpt"])}
    cmd.update(dict(zip(args[::2], args[1::2])))
    before = sorted(p.name for p in d["folder"].parent.rglob("*"))
    code, _, err = _cli(capsys, "nnunet-attach", *[x for kv in cmd.items() for x in kv])
    _one_line(code, err, *needles)
    assert sorted(p.name for p in d["folder"].parent.rglob("*")) == before


# ------------------------------------------------------------------------------------ item 4: NaN / Inf weights

def test_nonfinite_weights_are_refused_by_the_loader(plain, tmp_path):
    bad = tmp_path / "diverged.safetensors"
    keys = []
    _rewrite(plain, bad, change=lambda t: keys.extend(_poison(t)))
    with pytest.raises(CheckpointError, match=r"diverged.safetensors holds NaN or Inf values in .*\(5 tensors\)"):
        load_checkpoint(bad)
    network = tiny_backbone("plain_conv_unet", seed=3).network
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(CheckpointError, match=keys[0]):
        load_pretrained_encoder(network, bad)
    sd = {k: v.clone() for k, v in tiny_backbone("plain_conv_unet").network.state_dict().items()}
    first = next(k for k in sd if k.startswith("encoder.") and k.endswith(".weight"))
    sd[first].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=f"the state dict holds NaN or Inf values in {first}"):
        load_pretrained_encoder(network, sd)
    torch.save({"state_dict": sd}, tmp_path / "foreign.pt")  # foreign files too
    with pytest.raises(CheckpointError, match="foreign.pt holds NaN or Inf"):
        load_pretrained_encoder(network, tmp_path / "foreign.pt")
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())  # nothing was loaded
    assert read_checkpoint_info(bad).values > 0  # inspect still shows what the file holds


def test_nonfinite_weights_are_refused_by_export_and_attach(nnunet_dataset, capsys, tmp_path):
    d = nnunet_dataset
    bad = _rewrite(d["ckpt"], tmp_path / "diverged.safetensors", change=_poison)
    before = _plans_files(d["folder"])
    for to in ("nnunet", "nnssl"):
        code, _, err = _cli(capsys, "export", bad, "--to", to, "-o", tmp_path / "out.pth")
        _one_line(code, err, bad, "NaN or Inf", "(5 tensors)", "earlier checkpoint")
    code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", bad)
    _one_line(code, err, bad, "NaN or Inf")
    assert not (tmp_path / "out.pth").exists() and _plans_files(d["folder"]) == before


# ------------------------------------------------------------------------------ item 8: malformed metadata block

def _set(path, value):
    def mutate(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        return meta
    return mutate


_DELETE = object()
MALFORMED = {
    "not_an_object": (lambda m: [1, 2], "not a med3dinsight-checkpoint header"),
    "no_backbone": (_set("backbone", _DELETE), "'backbone' must be an object (the build_backbone arguments), it is "
                                               "missing"),
    "backbone_string": (_set("backbone", "nnunet"), "'backbone' must be an object"),
    "unknown_backbone": (_set("backbone.name", "vit9000"), "'backbone.name' must be one of"),
    "patch_two_ints": (_set("patch_size", [32, 32]), "'patch_size' must be three positive integers"),
    "patch_strings": (_set("backbone.patch_size", ["a", "b", "c"]), "'backbone.patch_size'"),
    "in_channels_bool": (_set("in_channels", True), "'in_channels' must be a positive integer"),
    "prefixes_string": (_set("encoder_prefixes", "encoder."), "'encoder_prefixes' must be a list"),
    "prefixes_ints": (_set("encoder_prefixes", [1]), "'encoder_prefixes' must be a list"),
    "plan_list": (_set("adaptation_plan", [1]), "'adaptation_plan' must be an object"),
    "plan_in_proj_string": (_set("adaptation_plan.keys_to_in_proj", "encoder.stem"),
                            "'adaptation_plan.keys_to_in_proj'"),
    "plan_channels_string": (_set("adaptation_plan.pretrain_num_input_channels", "1"),
                             "'adaptation_plan.pretrain_num_input_channels'"),
    "alias_to_nothing": (_set("aliases", {"network.x": "network.nope"}), "'aliases.network.x'"),
    "aliases_list": (_set("aliases", ["network.x"]), "'aliases' must be an object of strings"),
    "version_string": (_set("format_version", "1"), "'format_version' must be a positive integer"),
    "newer_version": (_set("format_version", 99), "upgrade the package"),
    "unknown_builder_argument": (_set("backbone.depth", 3), "'backbone.depth' must be absent"),
    "foreign_network_class": (_set("backbone.architecture.network_class_name", "os.system"),
                              "'backbone.architecture.network_class_name'"),
    "op_outside_torch": (_set("backbone.architecture.arch_kwargs.conv_op", "subprocess.Popen"),
                         "'backbone.architecture.arch_kwargs.conv_op' must be null or a torch.nn class name"),
    "no_strides": (_set("backbone.architecture.arch_kwargs.strides", _DELETE),
                   "'backbone.architecture.arch_kwargs.strides'"),
    "psat_string": (_set("psat", "small"), "'psat' must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_one_line_everywhere(plain, tmp_path, capsys, case):
    mutate, needle = MALFORMED[case]
    bad = _rewrite(plain, tmp_path / f"{case}.safetensors", meta=mutate(_meta(plain)))
    with pytest.raises(CheckpointError, match="re-save|upgrade") as e:
        load_checkpoint(bad)
    assert needle in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        read_checkpoint_info(bad)
    with pytest.raises(CheckpointError):
        load_pretrained_encoder(tiny_backbone("plain_conv_unet").network, bad)
    code, _, err = _cli(capsys, "inspect", bad)
    _one_line(code, err, bad, needle)
    code, _, err = _cli(capsys, "export", bad, "--to", "nnssl", "-o", tmp_path / "out.pth")
    _one_line(code, err, bad, needle)
    assert not (tmp_path / "out.pth").exists()


def test_malformed_metadata_through_nnunet_attach(nnunet_dataset, capsys, tmp_path):
    d = nnunet_dataset
    before = _plans_files(d["folder"])
    cases = {case: MALFORMED[case] for case in ("backbone_string", "not_an_object", "alias_to_nothing")}
    cases["foreign_class_in_plans"] = (  # the architecture inside the stored plans is checked like a direct one
        _set("backbone.plans.configurations.3d_fullres.architecture.network_class_name", "os.system"),
        "'backbone.plans.configurations.3d_fullres.architecture.network_class_name'")
    for case, (mutate, needle) in cases.items():
        bad = _rewrite(d["ckpt"], tmp_path / f"{case}.safetensors", meta=mutate(_meta(d["ckpt"])))
        for extra in ([], ["--adapt-architecture"]):
            code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", bad, *extra)
            _one_line(code, err, bad, needle)
    assert _plans_files(d["folder"]) == before


def test_metadata_the_network_builder_rejects_names_the_file(tmp_path, capsys):
    good = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "s.safetensors")
    meta = _meta(good)
    meta["backbone"]["network_kwargs"]["bogus_argument"] = 1
    bad = _rewrite(good, tmp_path / "bogus.safetensors", meta=meta)
    code, _, err = _cli(capsys, "export", bad, "--to", "monai", "-o", tmp_path / "m.pt")
    _one_line(code, err, bad, "cannot be built", "bogus_argument", "re-save")
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------ item 10: memory bombs, tiny files

def _claims(name, meta):
    """Metadata claiming a network 10-50 times larger than the file's (at most a few hundred MB if it were built)."""
    backbone = meta["backbone"]
    if name == "swin_unetr":
        backbone["network_kwargs"]["feature_size"] = 48
    elif name == "unetr":
        backbone["network_kwargs"].update(hidden_size=768, mlp_dim=3072, num_heads=12)
    else:
        kwargs = backbone["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = [24 * f for f in kwargs["features_per_stage"]]
    return meta


@pytest.mark.parametrize("name", ["swin_unetr", "unetr", "plain_conv_unet"])
def test_metadata_claiming_a_huge_network_is_refused_before_it_is_built(name, tmp_path, capsys):
    from med3dinsight_plugin.classifier import Med3DInsightClassifier

    good = save_pretrained(tiny_backbone(name), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "claims.safetensors", meta=_claims(name, _meta(good)))
    to = "nnssl" if name == "plain_conv_unet" else "monai"  # nnssl's tools build only nnU-Net's CNNs
    code, _, err = _cli(capsys, "export", bad, "--to", to, "-o", tmp_path / "out.pth")
    _one_line(code, err, bad, "far more than the", "stored in the file", "re-save")
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises(CheckpointError, match="far more than the"):
        Med3DInsightClassifier.from_pretrained(bad, num_classes=2)
    code, _, err = _cli(capsys, "export", good, "--to", to, "-o", tmp_path / "out.pth")  # the guard's control
    assert code == 0, err


def test_attach_adapting_to_a_claimed_huge_network_is_refused(nnunet_dataset, tmp_path, capsys):
    d = nnunet_dataset
    good = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "swin.safetensors")
    bad = _rewrite(good, tmp_path / "claims.safetensors", meta=_claims("swin_unetr", _meta(good)))
    before = _plans_files(d["folder"])
    code, _, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", bad, "--adapt-architecture")
    _one_line(code, err, bad, "far more than the")
    assert _plans_files(d["folder"]) == before
    code, out, err = _cli(capsys, "nnunet-attach", "-d", d["id"], "--checkpoint", good, "--adapt-architecture")
    assert code == 0 and "(100.0 %)" in out, err


def _header_only_file(path, declared_elements, sparse=False):
    """A safetensors header declaring one float32 tensor of ``declared_elements``, followed by 4 KB of data, or
    (``sparse``) by a hole up to the declared end: the file's size then matches its header."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [declared_elements],
                               "data_offsets": [0, 4 * declared_elements]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        if sparse:
            f.truncate(8 + len(header) + 4 * declared_elements)
        else:
            f.write(b"\0" * 4096)
    return path


def test_header_declaring_more_than_the_file_holds(tmp_path, capsys):
    small = _header_only_file(tmp_path / "claims12gb.safetensors", 3 << 30)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(small)
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint_info(small)
    code, _, err = _cli(capsys, "inspect", small)
    _one_line(code, err, small, "re-save or re-download")


def test_sparse_file_is_inspected_from_its_header_and_never_loaded(tmp_path):
    n = 1 << 28  # 1 GiB of float32 declared, about 4 KB on disk (kept small in case it were ever read)
    sparse = _header_only_file(tmp_path / "sparse.safetensors", n, sparse=True)
    if sparse.stat().st_blocks * 512 > 1 << 20:
        sparse.unlink()
        pytest.skip("this filesystem does not keep sparse files")
    info = read_checkpoint_info(sparse)  # header only
    assert info.source_format == "state_dict" and info.tensors == {"w": ((n,), "float32")} and info.values == n
    with pytest.raises(CheckpointError, match="sparse file.*re-download"):
        load_checkpoint(sparse)


def test_cli_inspect_of_a_sparse_file_reads_its_header_only(tmp_path, capsys):
    sparse = _header_only_file(tmp_path / "sparse.safetensors", 1 << 28, sparse=True)
    if sparse.stat().st_blocks * 512 > 1 << 20:
        sparse.unlink()
        pytest.skip("this filesystem does not keep sparse files")
    code, out, err = _cli(capsys, "inspect", sparse)
    assert code == 0 and f"{sparse}: state_dict, 1 network tensors, 268.44M values" in out, err


def test_header_only_info_matches_the_loaded_checkpoint(tiny_backbone_name, tmp_path):
    path = save_pretrained(tiny_backbone(tiny_backbone_name), tmp_path / "c.safetensors", teacher="t")
    info, ckpt = read_checkpoint_info(path), load_checkpoint(path)
    assert info.source_format == "med3dinsight" and info.metadata == ckpt.metadata
    assert info.encoder_prefixes == ckpt.encoder_prefixes
    assert info.tensors == {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in ckpt.state_dict.items()}
    assert info.values == sum({storage_id(t): t.numel() for t in ckpt.state_dict.values()}.values())
    torch.save({"network_weights": ckpt.state_dict, "trainer_name": "nnUNetTrainer"}, tmp_path / "n.pth")
    foreign = read_checkpoint_info(tmp_path / "n.pth")  # torch zip files are memory-mapped, not read
    assert foreign.source_format == "nnunet" and foreign.tensors == info.tensors and foreign.values == info.values


# ---------------------------------------------------------------------------------- item 14: sweep of bad paths

class _Payload:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def _torch_file_claiming(path, numel):
    """torch.save of a 4-element tensor whose pickled storage entry claims ``numel`` elements."""
    import pickletools

    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    data, seen_location = records[name], False
    for op, arg, pos in pickletools.genops(data):
        seen_location = seen_location or arg == "cpu"
        if seen_location and op.name == "BININT1" and arg == 4:  # ('storage', type, key, 'cpu', numel)
            records[name] = data[:pos] + b"J" + struct.pack("<I", numel) + data[pos + 2:]  # BININT: 4 bytes
            break
    else:
        raise AssertionError("storage numel not found in the pickle")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, content in records.items():
            z.writestr(n, content)
    return path


def _unusable(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with open(tmp_path / "plain_pickle.pt", "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f, protocol=4)
    with zipfile.ZipFile(tmp_path / "not_torch.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "obj": _Payload()}, tmp_path / "foreign_class.pt")
    sd = tiny_backbone("plain_conv_unet").network.state_dict()
    torch.save({"network_weights": sd, "nnssl_adaptation_plan": ["encoder"]}, tmp_path / "bad_plan.pth")
    _torch_file_claiming(tmp_path / "claims_2gb.pt", 1 << 29)  # torch compares it with the record: not allocated
    _torch_file_claiming(tmp_path / "claims_negative.pt", 3 << 30)  # a negative int32: torch raised TypeError
    return {"empty_folder": "is a folder with 0 .safetensors files",
            "empty.safetensors": "is empty (0 bytes)",
            "plain_pickle.pt": "needs arbitrary unpickling",
            "not_torch.pt": "not a torch checkpoint",
            "foreign_class.pt": "holds an object of class",
            "bad_plan.pth": "nnssl_adaptation_plan must be a dict",
            "claims_2gb.pt": "not a torch checkpoint",
            "claims_negative.pt": "not a torch checkpoint"}


def test_unusable_checkpoint_files_give_one_line(tmp_path, capsys):
    _Payload.marker = tmp_path / "executed"
    for name, needle in _unusable(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert needle in str(e.value) and str(path) in str(e.value)
        commands = [["export", path, "--to", "nnssl", "-o", tmp_path / "out.pth"]]
        if name != "claims_2gb.pt":  # inspect memory-maps torch files: it shows the 4 values the tensor views
            commands.append(["inspect", path])
        for args in commands:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                code, _, err = _cli(capsys, *args)
            _one_line(code, err, path, needle)
            assert not [w for w in caught if "pickle" in str(w.message).lower()], name  # torch's multi-line warning
    assert not _Payload.marker.exists() and not (tmp_path / "out.pth").exists()


def test_export_plans_mistakes_and_writing_over_its_input(nnunet_plans, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_pretrained(build_backbone("nnunet", plans=nnunet_plans["plain"]), tmp_path / "p.safetensors")
    original = ckpt.read_bytes()
    dataset_json = nnunet_plans["plain"].parent / "dataset.json"
    code, _, err = _cli(capsys, "export", ckpt, "--to", "nnunet", "--plans", dataset_json, "-o", tmp_path / "x.pth")
    _one_line(code, err, dataset_json, "no 'configurations'")
    other = json.loads(nnunet_plans["plain"].read_text())  # another dataset's plans: other widths
    kwargs = other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [f // 2 for f in kwargs["features_per_stage"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, _, err = _cli(capsys, "export", ckpt, "--to", "nnunet", "--plans", tmp_path / "other.json",
                        "-o", tmp_path / "x.pth")
    _one_line(code, err, ckpt, "was not pretrained on the network", "Med3DInsightTrainer")
    code, _, err = _cli(capsys, "export", ckpt, "--to", "nnunet", "--plans", nnunet_plans["plain"],
                        "--configuration", "2d_nope", "-o", tmp_path / "x.pth")
    _one_line(code, err, nnunet_plans["plain"], "2d_nope")
    code, _, err = _cli(capsys, "export", ckpt, "--to", "nnssl", "-o", ckpt)
    _one_line(code, err, ckpt, "is the checkpoint being exported")
    assert ckpt.read_bytes() == original and not (tmp_path / "x.pth").exists()


def test_hand_edited_plans_entry_is_a_user_error(monkeypatch):
    from nnunet_trainers.attach import configured_checkpoint

    monkeypatch.delenv("MED3DINSIGHT_CHECKPOINT", raising=False)
    assert configured_checkpoint({"plans_name": "p"}) == (None, "plans 'p'")
    assert configured_checkpoint({"plans_name": "p", "med3dinsight": {"checkpoint": "/w.safetensors"}})[0] == \
        "/w.safetensors"
    for entry in ("/w.safetensors", {"checkpoint": 3}, {"sha256": "x"}, []):
        with pytest.raises(Med3DInsightError, match="plans 'p': its 'med3dinsight' entry must be an object"):
            configured_checkpoint({"plans_name": "p", "med3dinsight": entry})
