"""Checkpoints on the Hugging Face Hub: ``hf-hub:ORG/REPO[@REVISION]`` through every entry point that takes a
checkpoint, offline, from a local hub cache laid out as huggingface_hub writes it; and ``med3dinsight push`` (its dry
run and its offline refusal only: nothing is ever uploaded)."""
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import run_tool
from med3dinsight_plugin import build_backbone, load_checkpoint, load_pretrained_encoder, save_pretrained
from med3dinsight_plugin.checkpoint import CheckpointError, read_checkpoint_info

MAIN, V1 = "1" * 39 + "a", "2" * 39 + "b"  # the commits refs/main and refs/v1 point to
TINY = dict(patch_size=(32, 32, 32), base_features=4, max_features=16)
META = dict(
    intensity_normalization={"scheme": "CTNormalization", "mean": 41.5, "std": 120.25, "percentile_00_5": -990.0,
                             "percentile_99_5": 1500.0},
    orientation="canonical LPS: axis 0 toward superior, 1 toward posterior, 2 toward the patient's left",
    teacher={"model": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "pretrained": None,
             "embed_dim": 512, "weights_fingerprint": "0123456789abcdef"},
    captions={"sha256": "f" * 64, "model": "Qwen/Qwen2-VL-2B-Instruct"},
    data={"kind": "nifti", "root": "/home/someone/private/Dataset990_Tiny", "modality": "ct", "num_channels": 1,
          "num_cases": 12},
    pretraining={"steps": 300, "global_batch": 8, "world_size": 1, "config": {}},
)


def _tiny(seed):
    torch.manual_seed(seed)
    return build_backbone("plain_conv_unet", **TINY)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding ``org/repo`` at two commits (``main`` and ``v1``, different weights), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--repo"
    weights = {}
    for commit, seed in ((MAIN, 0), (V1, 1)):
        backbone = _tiny(seed)
        written = save_pretrained(backbone, tmp_path / f"{commit}.safetensors", **META)
        blob = repo / "blobs" / hashlib.sha256(written.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        written.rename(blob)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "med3dinsight.safetensors").symlink_to(os.path.relpath(blob, snapshot))
        weights[commit] = {k: v.clone() for k, v in backbone.network.state_dict().items()}
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub read the variables at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("MED3DINSIGHT_CHECKPOINT", raising=False)
    return SimpleNamespace(cache=cache, repo=repo, weights=weights, env={**os.environ, **env})


SPECS = [("hf-hub:org/repo", MAIN), ("hf-hub:org/repo@main", MAIN), ("hf-hub:org/repo@v1", V1),
         (f"hf-hub:org/repo@{V1}", V1)]


# ------------------------------------------------------------------------------------------------ the entry points

def _via_load_checkpoint(spec, tmp_path):
    ckpt = load_checkpoint(spec)
    return ckpt.path, ckpt.state_dict


def _via_read_checkpoint_info(spec, tmp_path):
    info = read_checkpoint_info(spec)
    assert info.source_format == "med3dinsight" and info.metadata["orientation"] == META["orientation"]
    return info.path, None


def _via_loader(spec, tmp_path):
    network = _tiny(7).network
    report = load_pretrained_encoder(network, spec)
    assert report.coverage == 100.0 and report.applied
    return Path(report.source), network.state_dict()


def _via_monai_handler(spec, tmp_path):
    from ignite.engine import Engine

    from med3dinsight_plugin.monai_support import PretrainedEncoderLoader

    network = _tiny(7).network
    loader = PretrainedEncoderLoader(spec, network)
    loader(Engine(lambda engine, batch: None))
    assert loader.report.coverage == 100.0
    return Path(loader.report.source), network.state_dict()


def _via_export(spec, tmp_path):
    from med3dinsight_plugin.export import export_checkpoint

    out = tmp_path / f"export_{abs(hash(spec))}.pth"
    export_checkpoint(spec, "nnunet", out)
    return None, torch.load(out, weights_only=True)["network_weights"]


def _via_rebuild_backbone(spec, tmp_path):
    from med3dinsight_plugin.export import rebuild_backbone

    return None, rebuild_backbone(spec).network.state_dict()


def _via_nnunet_attach(spec, tmp_path):
    """nnunet-attach's plans writer (attach_checkpoint minus nnU-Net's dataset folders): it test-loads the Hub file
    and records it pinned to the commit read."""
    from nnunet_trainers.attach import attached_plans

    architecture = _tiny(0).config["architecture"]
    plans = {"plans_name": "P", "dataset_name": "Dataset990_Tiny",
             "configurations": {"3d_fullres": {"patch_size": [32, 32, 32], "architecture": architecture}}}
    new, report, _, family = attached_plans(plans, tmp_path / "P.json", "P__med3dinsight", spec, "3d_fullres",
                                            False, {"channel_names": {"0": "CT"}})
    entry = new["med3dinsight"]
    local = read_checkpoint_info(spec).path
    assert report.coverage == 100.0 and family == "nnunet"
    assert entry["checkpoint"] == f"hf-hub:org/repo@{local.parent.name}"  # pinned: the branch may move on
    assert entry["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    return local, load_checkpoint(entry["checkpoint"]).state_dict  # the pinned reference reads the same file


def _trainer_load(plans, tmp_path):
    """Med3DInsightTrainer.load_pretrained_checkpoint on a stand-in for the trainer (building a real trainer needs
    a preprocessed dataset; nothing here trains)."""
    from nnunet_trainers.trainers import Med3DInsightTrainer

    log = []
    fake = SimpleNamespace(plans_manager=SimpleNamespace(plans=plans), network=_tiny(7).network, local_rank=0,
                           output_folder=str(tmp_path), print_to_log_file=lambda *a, **k: log.append(a[0]))
    fake._stop = lambda message, details=None: Med3DInsightTrainer._stop(fake, message, details)
    Med3DInsightTrainer.load_pretrained_checkpoint(fake)
    assert fake.pretrained_load_report.coverage == 100.0 and not any("WARNING" in line for line in log)
    return Path(fake.pretrained_load_report.source), fake.network.state_dict()


def _via_trainer_env_variable(spec, tmp_path):
    os.environ["MED3DINSIGHT_CHECKPOINT"] = spec  # removed by the hub fixture's monkeypatch
    try:
        return _trainer_load({"plans_name": "nnUNetPlans"}, tmp_path)
    finally:
        del os.environ["MED3DINSIGHT_CHECKPOINT"]


def _via_trainer_plans_entry(spec, tmp_path):
    entry = {"checkpoint": spec}
    try:
        entry["sha256"] = hashlib.sha256(read_checkpoint_info(spec).path.read_bytes()).hexdigest()
    except CheckpointError:  # a missing file: the trainer must say so itself
        pass
    return _trainer_load({"plans_name": "P__med3dinsight", "med3dinsight": entry}, tmp_path)


ENTRY_POINTS = [_via_load_checkpoint, _via_read_checkpoint_info, _via_loader, _via_monai_handler, _via_export,
                _via_rebuild_backbone, _via_nnunet_attach, _via_trainer_env_variable, _via_trainer_plans_entry]


@pytest.mark.parametrize("spec,commit", SPECS)
def test_every_entry_point_reads_the_hub_checkpoint_of_the_revision(hub, tmp_path, spec, commit):
    expected = hub.weights[commit]
    for entry_point in ENTRY_POINTS:
        path, state = entry_point(spec, tmp_path)
        where = f"{entry_point.__name__}({spec})"
        if path is not None:
            assert Path(path).parent == hub.repo / "snapshots" / commit, where
        if state is not None:  # the encoder is the revision's (the loaders load the encoder only)
            encoder = [k for k in expected if k.startswith("encoder.")]
            assert encoder and all(torch.equal(state[k], expected[k]) for k in encoder), where


def test_missing_repo_or_revision_fails_offline_with_one_line_and_the_fetch_command(hub, tmp_path, capsys):
    for spec, command in (("hf-hub:org/missing", "hf download org/missing med3dinsight.safetensors"),
                          ("hf-hub:org/repo@v2", "hf download org/repo med3dinsight.safetensors --revision v2")):
        for entry_point in ENTRY_POINTS:
            if entry_point.__name__.startswith("_via_trainer"):
                with pytest.raises(SystemExit) as stop:  # the trainer stops the run with exit code 2
                    entry_point(spec, tmp_path)
                assert stop.value.code == 2
                message = capsys.readouterr().err.strip()
            else:
                with pytest.raises(CheckpointError) as e:
                    entry_point(spec, tmp_path)
                message = str(e.value)
            assert len(message.splitlines()) == 1, (entry_point.__name__, message)
            assert command in message and "HF_HUB_OFFLINE is set" in message, (entry_point.__name__, message)
            assert "not in the local Hugging Face cache" in message, message


def test_hub_failures_online_are_one_line(hub, monkeypatch):
    """What the Hub answers (hf_hub_download replaced: no network), each as one line with its remedy."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    from med3dinsight_plugin import hub as hub_module

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/org/x"))
    cases = [(errors.RepositoryNotFoundError("404", response=response), "no model repository of that name"),
             (errors.GatedRepoError("403", response=response), "gated repository"),
             (errors.RevisionNotFoundError("404", response=response), "no such branch, tag or commit"),
             (errors.RemoteEntryNotFoundError("404", response=response), "med3dinsight push CHECKPOINT org/x"),
             (errors.LocalEntryNotFoundError("offline"), "the Hub cannot be reached; fetch it where there is "
                                                         "network: hf download org/x med3dinsight.safetensors"),
             (httpx2.ConnectError("connection refused\nmore"), "(connection refused); check the network")]
    monkeypatch.setattr(hub_module, "hub_offline", lambda: False)
    for error, what in cases:
        def download(*args, error=error, **kwargs):
            assert kwargs["local_files_only"] is False
            raise error
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint("hf-hub:org/x")
        message = str(e.value)
        assert message.startswith("hf-hub:org/x: ") and what in message and len(message.splitlines()) == 1, message


def test_malformed_specs_are_one_line(hub, capsys):
    from med3dinsight_plugin.cli import main

    for spec, what in (("hf-hub:", "names no repository"), ("hf-hub:a/b/c", "'a/b/c' is not ORG/REPO"),
                       ("hf-hub:org", "'org' is not ORG/REPO"), ("hf-hub:org/repo@", "is not a revision"),
                       ("hf-hub:-org/repo", "is not a Hub repository id")):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(spec)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and what in message and "hf-hub:ORG/REPO@REVISION" in message, message
        assert main(["inspect", spec]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("med3dinsight inspect: error: ") and what in err[0], err


@pytest.mark.slow
def test_cli_inspect_and_export_from_the_hub_in_a_subprocess(hub, tmp_path):
    r = run_tool(["med3dinsight", "inspect", "hf-hub:org/repo@v1"], hub.env)
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"hf-hub:org/repo@v1 ({hub.repo / 'snapshots' / V1 / 'med3dinsight.safetensors'}): "
                            f"med3dinsight"), first
    assert "orientation" in r.stdout and "CTNormalization" in r.stdout
    out = tmp_path / "exported.pth"
    r = run_tool(["med3dinsight", "export", "hf-hub:org/repo", "--to", "nnssl", "-o", out], hub.env)
    assert r.stdout.startswith(f"wrote {out} (nnssl, ")
    exported = torch.load(out, weights_only=True)["network_weights"]
    assert all(torch.equal(exported[k], v) for k, v in hub.weights[MAIN].items())
    r = run_tool(["med3dinsight", "inspect", "hf-hub:org/missing"], hub.env, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("med3dinsight inspect: error: hf-hub:org/missing: ")
    assert "hf download org/missing med3dinsight.safetensors" in lines[0]


# ------------------------------------------------------------------------------------------------------------ push

def test_push_dry_run_writes_the_file_and_a_model_card(hub, tmp_path, capsys):
    from med3dinsight_plugin.cli import main

    source = tmp_path / "run" / "med3dinsight.safetensors"
    source.parent.mkdir()
    save_pretrained(_tiny(3), source, **META)
    folder = tmp_path / "staging"
    assert main(["push", str(source), "org/published", "--revision", "v2", "--dry-run", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"to {folder} (dry run: nothing uploaded" in out
    assert sorted(p.name for p in folder.iterdir()) == [".med3dinsight-push.json", "README.md",
                                                         "med3dinsight.safetensors"]
    assert _tensor_bytes(folder / "med3dinsight.safetensors") == _tensor_bytes(source)  # the header: no paths
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: med3dinsight\n") and "# org/published" in card
    for fact in ("nnunet (PlainConvUNet)", "| input channels | 1 |", "| patch size | 32 x 32 x 32 |",
                 "| spacing | each volume's own spacing (not resampled) |",
                 "CTNormalization (mean 41.5, std 120.2", "canonical LPS: axis 0 toward superior",
                 "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "512-d",
                 "Qwen/Qwen2-VL-2B-Instruct", "Dataset990_Tiny, nifti, modality ct, 12 cases, 1 channel(s)",
                 "steps 300, global batch 8, world size 1",
                 "med3dinsight nnunet-attach -d DATASET -p nnUNetPlans --checkpoint hf-hub:org/published@v2   # + "
                 "--adapt-architecture unless your plans build this network\n",
                 "-tr Med3DInsightTrainer\n", "MED3DINSIGHT_CHECKPOINT=hf-hub:org/published@v2 nnUNetv2_train",
                 'load_pretrained_encoder(network, "hf-hub:org/published@v2")',
                 'PretrainedEncoderLoader("hf-hub:org/published@v2", network)',
                 "hf download org/published med3dinsight.safetensors --revision v2"):
        assert fact in card, fact
    assert "/home/someone" not in card  # the dataset's name, not the pretraining machine's path


def test_push_card_of_a_swin_unetr_says_how_to_build_it():
    from helpers import TINY_BACKBONES
    from med3dinsight_plugin.publish import model_card

    cfg = {k: v for k, v in TINY_BACKBONES["swin_unetr"].items() if k != "patch_size"}
    meta = {"backbone": {"name": "swin_unetr", "in_channels": 1, "network_kwargs": {"out_channels": 2, **cfg}},
            "network_class": "monai.networks.nets.swin_unetr.SwinUNETR", "in_channels": 1,
            "patch_size": [64, 64, 64], "encoder_prefixes": ["swinViT."]}
    card = model_card(meta, "org/swin")
    assert "--checkpoint hf-hub:org/swin --adapt-architecture\n" in card
    assert "-tr Med3DInsightTrainer_SwinUNETR\n" in card
    assert "MED3DINSIGHT_CHECKPOINT=hf-hub:org/swin nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS" in card
    assert "- swin_unetr\n- monai\n---" in card
    assert ("network = SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=12, depths=(1, 1, 1, 1), "
            "num_heads=(1, 1, 2, 2))") in card
    assert "| intensity normalisation | not recorded |" in card and "hf download org/swin med3dinsight" in card


def test_push_refuses_offline_before_anything_is_sent(hub, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from med3dinsight_plugin.cli import main

    def sent(*args, **kwargs):
        raise AssertionError("push talked to the Hub while offline")

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, sent)
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors")
    assert main(["push", str(source), "org/published"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("med3dinsight push: error: HF_HUB_OFFLINE is set, so nothing was "
                                               "uploaded to org/published"), err
    assert "--dry-run FOLDER" in err[0]


def test_push_uploads_the_staged_folder_in_one_commit(hub, tmp_path, capsys, monkeypatch):
    """Online push with HfApi's methods replaced by recorders: nothing can reach the network."""
    import huggingface_hub

    from med3dinsight_plugin import publish
    from med3dinsight_plugin.cli import main

    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(p.name for p in folder.iterdir())
                kwargs["card"] = (folder / "README.md").read_text()
                kwargs["weights"] = (folder / "med3dinsight.safetensors").read_bytes()
            calls.append((name, args, kwargs))
            return SimpleNamespace(commit_url="https://huggingface.co/org/published/commit/abc")
        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    monkeypatch.setattr(publish, "hub_offline", lambda: False)  # where push looks it up
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors", **META)
    assert main(["push", str(source), "org/published", "--revision", "dev", "--private"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == ("org/published",) and calls[0][2]["exist_ok"] and calls[0][2]["private"]
    assert calls[1][2]["branch"] == "dev" and calls[1][2]["exist_ok"]
    upload = calls[2][2]
    assert upload["repo_id"] == "org/published" and upload["revision"] == "dev"
    assert upload["allow_patterns"] == ["med3dinsight.safetensors", "README.md"]  # not push's list of its files
    assert "hf-hub:org/published@dev" in upload["card"]
    assert b"/home/someone" not in upload["weights"] and "/home/someone" not in upload["card"]  # names, not paths
    assert not Path(upload["folder_path"]).exists()  # the staging folder is removed after the upload
    out = capsys.readouterr().out
    assert "pushed med3dinsight.safetensors, README.md to org/published@dev: https://" in out
    assert "load it with: hf-hub:org/published@dev" in out


def test_push_refuses_foreign_files_and_bad_targets(hub, tmp_path):
    from med3dinsight_plugin.publish import push_checkpoint

    foreign = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="without med3dinsight metadata"):
        push_checkpoint(foreign, "org/x", dry_run=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors")
    for target, what in (("org/x/y", "is not ORG/REPO"), ("org/x@dev", "--revision dev")):
        with pytest.raises(CheckpointError, match=what):
            push_checkpoint(source, target, dry_run=tmp_path / "out")


def test_hub_helpers_are_shared_and_huggingface_hub_is_imported_lazily():
    import subprocess

    from med3dinsight_plugin import hub
    from med3dinsight_plugin.teacher import hub as teacher_hub

    assert teacher_hub.hub_offline is hub.hub_offline  # moved; the teacher modules' import still works
    code = ("import sys, med3dinsight_plugin.checkpoint, med3dinsight_plugin.loading, med3dinsight_plugin.export, "
            "med3dinsight_plugin.hub; print('huggingface_hub' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------------- robustness (issue #22)

def test_hub_revisions_and_repo_ids_are_checked_where_they_enter(hub, tmp_path, capsys):
    """A revision is a file name in huggingface_hub's cache (refs/NAME): '@../..' must not reach it; a long value is
    shortened in the one line."""
    from helpers import one_line_failure
    from med3dinsight_plugin.cli import main

    long = "a" * 5000
    for spec, what in (("hf-hub:org/repo@../../../../etc/hostname", "'../../../../etc/hostname' after '@' is not a"),
                       ("hf-hub:org/repo@refs/../../x", "a part starting with '.'"),
                       ("hf-hub:org/repo@/etc/passwd", "a leading, trailing or doubled '/'"),
                       ("hf-hub:org/repo@v1~1", "one of ~ ^ : ? * [ \\ @"),
                       (f"hf-hub:org/repo@{long}", "5000 characters; at most 255"),
                       (f"hf-hub:org/{long}", "is not a Hub repository id"),
                       (f"hf-hub:{long}", "is not ORG/REPO")):
        code = main(["inspect", spec])
        line = one_line_failure(code, capsys.readouterr().err.strip().splitlines(), what, "hf-hub:ORG/REPO@REVISION")
        assert len(line) < 400 and long not in line, line
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors")
    code = main(["push", str(source), "org/published", "--revision", "../../x", "--dry-run", str(tmp_path / "out")])
    one_line_failure(code, capsys.readouterr().err.strip().splitlines(), "--revision '../../x'", "a part starting")
    assert not (tmp_path / "out").exists()
    assert load_checkpoint("hf-hub:org/repo@v1").path.parent.name == V1  # ordinary revisions still pass


def _hint_uploads(out):
    """The files of its folder that the ``hf upload`` line a dry run prints would upload (hf's own filter)."""
    import shlex

    from huggingface_hub.utils import filter_repo_objects

    line = next(line for line in out.splitlines() if "push them with: " in line)
    command = shlex.split(line.split("push them with: ", 1)[1].rsplit(")", 1)[0])
    assert command[:2] == ["hf", "upload"], command
    folder, includes = Path(command[3]), [command[i + 1] for i, a in enumerate(command) if a == "--include"]
    return command, sorted(filter_repo_objects([p.name for p in folder.iterdir()], allow_patterns=includes or None))


def test_push_dry_run_never_replaces_files_it_did_not_write(hub, tmp_path, capsys, monkeypatch):
    from helpers import one_line_failure
    from med3dinsight_plugin.cli import main

    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors", **META)
    # another run's folder: its checkpoint, a project README, notes
    run = tmp_path / "other_run"
    run.mkdir()
    theirs = save_pretrained(_tiny(5), run / "med3dinsight.safetensors").read_bytes()
    (run / "README.md").write_text("# my project\n")
    (run / "notes.txt").write_text("keep me\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for folder, names in ((run, "README.md, med3dinsight.safetensors, notes.txt"),
                          (tmp_path / "only_readme", "README.md"),
                          (tmp_path / "only_ckpt", "med3dinsight.safetensors")):
        if folder != run:
            folder.mkdir()
            (folder / names).write_bytes(theirs)
        snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
        code = main(["push", str(source), "org/published", "--dry-run", str(folder)])
        one_line_failure(code, capsys.readouterr().err.strip().splitlines(),
                         f"--dry-run {folder} already holds {names}", "which med3dinsight push did not write there",
                         "pass a new or empty folder")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot  # nothing written, nothing replaced
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # another run's checkpoint, a project README

    # a new folder, then the same folder again (an earlier dry run's output), with another checkpoint
    staging = tmp_path / "staging"
    assert main(["push", str(source), "org/published", "--revision", "v2", "--dry-run", str(staging)]) == 0
    command, uploaded = _hint_uploads(capsys.readouterr().out)
    assert uploaded == ["README.md", "med3dinsight.safetensors"], command  # not the list push keeps there
    assert command[2:5] == ["org/published", str(staging), "."] and command[-2:] == ["--revision", "v2"], command
    other = save_pretrained(_tiny(4), tmp_path / "d.safetensors", **META)
    assert main(["push", str(other), "org/published", "--dry-run", str(staging)]) == 0
    staged, expected = load_checkpoint(staging).state_dict, load_checkpoint(other).state_dict
    assert staged.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in staged.items())
    assert not [p for p in staging.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()

    # a file added there, or push's own file edited since: refused, untouched
    (staging / "extra.txt").write_text("x")
    code = main(["push", str(source), "org/published", "--dry-run", str(staging)])
    one_line_failure(code, capsys.readouterr().err.strip().splitlines(), f"--dry-run {staging} holds extra.txt "
                     "besides an earlier push's files", "pass a new or empty folder")
    (staging / "extra.txt").unlink()
    (staging / "README.md").write_text("my own card\n")
    code = main(["push", str(source), "org/published", "--dry-run", str(staging)])
    one_line_failure(code, capsys.readouterr().err.strip().splitlines(), f"--dry-run {staging}: README.md was changed "
                     "since med3dinsight push wrote it")
    assert (staging / "README.md").read_text() == "my own card\n"

    # a push killed between two renames leaves a folder the next push accepts (its list allows old and new files)
    fresh = tmp_path / "fresh"
    assert main(["push", str(source), "org/published", "--dry-run", str(fresh)]) == 0
    real = os.replace

    def killed_at_the_card(src, dst):
        if Path(dst).name == "README.md":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_card)
    assert main(["push", str(other), "org/other", "--dry-run", str(fresh)]) == 130
    monkeypatch.setattr(os, "replace", real)
    (fresh / f".README.md.{os.getpid()}.{'0' * 32}.tmp").write_text("partial")  # as a SIGKILL leaves it
    capsys.readouterr()
    assert main(["push", str(other), "org/other", "--dry-run", str(fresh)]) == 0, capsys.readouterr().err
    assert "# org/other" in (fresh / "README.md").read_text()


def _tensor_bytes(path):
    """A safetensors file's tensor entries and data: all but the header's metadata."""

    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    return header, raw[8 + size:]


def test_push_publishes_names_not_local_paths(hub, tmp_path, capsys):
    """The card and the uploaded header carry the last component of every local path the metadata holds (the
    pretraining data, the run's folders, a teacher read from a folder); the file still loads, its tensors byte for
    byte the same; --keep-paths publishes the paths."""
    from med3dinsight_plugin.cli import main

    private = dict(META, teacher={**META["teacher"], "model": "local-dir:/home/someone/models/BiomedCLIP",
                                  "pretrained": "/home/someone/models/open_clip_pytorch_model.bin"},
                   captions={**META["captions"], "model": "/home/someone/models/Qwen2-VL-2B-Instruct"},
                   pretraining={**META["pretraining"], "config": {
                       "output": "/home/someone/runs/r1",
                       "data": {"source": "/home/someone/private/Dataset990_Tiny", "cache": "~/caches/tiny",
                                "raw": "C:\\Users\\someone\\raw", "crops": 0}}})
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors", **private)
    assert b"someone" in source.read_bytes()
    staging = tmp_path / "staging"
    assert main(["push", str(source), "org/published", "--dry-run", str(staging)]) == 0
    out = capsys.readouterr().out
    assert "note: local paths in the metadata (teacher.model, teacher.pretrained, captions.model, data.root and 4 " \
           "more) are published as their last component; --keep-paths publishes them whole" in out, out
    published = staging / "med3dinsight.safetensors"
    card = (staging / "README.md").read_text()
    for text in (published.read_bytes(), card.encode()):
        assert b"someone" not in text and b"/home" not in text and b"Users" not in text
    assert "local-dir:BiomedCLIP, weights open_clip_pytorch_model.bin" in card and "Qwen2-VL-2B-Instruct" in card
    # only the metadata's path strings changed: the tensors byte for byte, the file loads as the original
    assert _tensor_bytes(published) == _tensor_bytes(source)
    meta = load_checkpoint(published).metadata
    config = meta["pretraining"]["config"]
    assert (meta["data"]["root"], meta["teacher"]["model"], meta["captions"]["model"], config["output"],
            config["data"]) == ("Dataset990_Tiny", "local-dir:BiomedCLIP", "Qwen2-VL-2B-Instruct", "r1",
                                {"source": "Dataset990_Tiny", "cache": "tiny", "raw": "raw", "crops": 0})
    original = load_checkpoint(source).metadata
    assert {k: v for k, v in meta.items() if k not in ("data", "teacher", "captions", "pretraining")} == \
        {k: v for k, v in original.items() if k not in ("data", "teacher", "captions", "pretraining")}
    network = _tiny(7).network
    assert load_pretrained_encoder(network, str(published)).coverage == 100.0
    assert read_checkpoint_info(published).metadata == meta
    assert int.from_bytes(published.read_bytes()[:8], "little") % 8 == 0  # the header padded as safetensors does

    # --keep-paths: the file as it is, the card with the paths
    kept = tmp_path / "kept"
    assert main(["push", str(source), "org/published", "--dry-run", str(kept), "--keep-paths"]) == 0
    assert "note: local paths" not in capsys.readouterr().out
    assert (kept / "med3dinsight.safetensors").read_bytes() == source.read_bytes()
    assert "local-dir:/home/someone/models/BiomedCLIP" in (kept / "README.md").read_text()
    # a checkpoint without paths is published unchanged
    plain = save_pretrained(_tiny(3), tmp_path / "plain.safetensors")
    assert main(["push", str(plain), "org/plain", "--dry-run", str(tmp_path / "plain_out")]) == 0
    assert (tmp_path / "plain_out" / "med3dinsight.safetensors").read_bytes() == plain.read_bytes()


def test_push_card_states_the_spacing_the_metadata_records(hub, tmp_path, capsys):
    """A checkpoint pretrained on crops resampled to 2 mm (data.target_spacing) is not described as 'not
    resampled'; nor is one pretrained on the volume view."""
    from med3dinsight_plugin.cli import main
    from med3dinsight_plugin.publish import model_card

    resampled = dict(META, data={**META["data"], "target_spacing": [2.0, 2.0, 2.0]},
                     pretraining={**META["pretraining"], "config": {"data": {"view": "crop", "spacing": "median",
                                                                             "target_spacing": [2.0, 2.0, 2.0]}}})
    source = save_pretrained(_tiny(3), tmp_path / "c.safetensors", **resampled)
    assert main(["push", str(source), "org/published", "--dry-run", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| spacing | 2 x 2 x 2 mm (each volume resampled to it before cropping) |" in card, card
    assert "not resampled" not in card
    meta = load_checkpoint(source).metadata
    median = {**meta, "data": {**meta["data"], "target_spacing": [2.5, 1.5, 1.5]},
              "pretraining": {"config": {"data": {"view": "crop", "spacing": "median", "target_spacing": None}}}}
    assert "| spacing | 2.5 x 1.5 x 1.5 mm (the dataset median; each volume resampled to it before cropping) |" in \
        model_card(median, "org/x")
    volume = {**meta, "data": {k: v for k, v in meta["data"].items() if k != "target_spacing"},
              "pretraining": {"config": {"data": {"view": "volume", "spacing": "median", "target_spacing": None}}}}
    assert "| spacing | each volume's body box resampled to the patch size (the voxel size differs per volume) |" in \
        model_card(volume, "org/x")
    native = {**volume, "pretraining": {"config": {"data": {"view": "crop", "spacing": "native"}}}}
    assert "| spacing | each volume's own spacing (not resampled) |" in model_card(native, "org/x")
