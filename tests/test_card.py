"""The model card names each base model by what the files on disk say: a hub id's cached revision, a hub cache
snapshot, the metadata `hf download --local-dir` leaves, or a hash of the weights; and the licences."""

import hashlib
import json

import pytest
from huggingface_hub import constants

from ppcr.config import load_config
from ppcr.model.card import BaseModel, describe_mllm, describe_sam, export_licence

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def mllm_dir(d, card=None):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (d / "model.safetensors").write_bytes(b"weights")
    if card:
        (d / "README.md").write_text(f"---\n{card}\n---\n# a model\n")
    return d


def cfg_for(path, *overrides):
    return load_config(None, [f"model.mllm_path={path}", "model.tiny_family=null", *overrides])


def test_a_hf_download_local_dir_gives_its_commit(tmp_path):
    d = mllm_dir(tmp_path / "checkpoints" / "Qwen2.5-VL-7B-Instruct")
    meta = d / ".cache/huggingface/download/config.json.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(f'{COMMIT}\n"etag"\n1700000000.0\n')
    base = describe_mllm(cfg_for(d))
    assert (base.name, base.hub_id, base.revision, base.sha256) == (
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        COMMIT,
        None,
    )
    assert base.licence == "apache-2.0"


def test_a_hub_cache_snapshot_gives_repo_revision_and_the_licence_its_card_declares(tmp_path):
    d = mllm_dir(tmp_path / f"hub/models--llava-hf--llava-1.5-7b-hf/snapshots/{COMMIT}", card="license: llama2")
    base = describe_mllm(cfg_for(d))
    assert (base.hub_id, base.revision, base.licence) == ("llava-hf/llava-1.5-7b-hf", COMMIT, "llama2")
    sam = describe_sam(cfg_for(d, f"model.sam_checkpoint={d / 'model.safetensors'}"))
    assert export_licence([base, sam]) == "llama2"  # the weights derive from the MLLM


def test_a_hub_id_gives_the_revision_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory named like the org
    repo = tmp_path / "cache/models--someorg--tiny"
    mllm_dir(repo / "snapshots" / COMMIT, card="license: mit")
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    base = describe_mllm(cfg_for("someorg/tiny"))
    assert (base.name, base.hub_id, base.revision, base.licence) == ("someorg/tiny", "someorg/tiny", COMMIT, "mit")


def test_any_other_directory_is_named_by_a_hash_of_its_weights(tmp_path):
    d = mllm_dir(tmp_path / "my-model")
    base = describe_mllm(cfg_for(d))
    assert base.revision is None and base.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert base.licence == "other" and export_licence([base]) == "other"  # unknown: the card says to check


@pytest.mark.parametrize(
    "release,named",
    [
        (
            "sam_vit_b_01ec64.pth",
            "Meta's SAM vit_b (sam_vit_b_01ec64.pth, published md5 01ec64d29a2fca3f0661936605ae66f8)",
        ),
        ("mine.pth", "SAM vit_b (mine.pth)"),
    ],
)
def test_sam_is_named_by_its_release_and_hashed(tmp_path, release, named):
    (tmp_path / release).write_bytes(b"sam")
    cfg = load_config(
        None, [f"model.sam_checkpoint={tmp_path / release}", "model.sam_type=vit_b", "model.sam_image_size=1024"]
    )
    sam = describe_sam(cfg)
    assert sam == BaseModel(
        part="SAM",
        name=named,
        hub_id=None,
        revision=None,
        sha256=hashlib.sha256(b"sam").hexdigest(),
        licence="apache-2.0",
    )
