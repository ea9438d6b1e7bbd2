"""Base fingerprints (issue 22, part 1): checkpoints and exports record what their frozen parts were, every
loader compares, and a difference is refused with the file, both hashes and the flag; file hashes are
cached per file version; hub ids are pinned to the commit a run trained on."""

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import model_config

from ppcr.common import hashing
from ppcr.common.hashing import file_sha256, sha256_uncached
from ppcr.config import load_config
from ppcr.model import mllm
from ppcr.model.fingerprint import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    BaseMismatch,
    UnverifiedBaseWarning,
    base_fingerprint,
    check_base,
    check_model_settings,
    pin_revision,
)
from ppcr.model.saving import load_checkpoint, load_pretrained
from ppcr.model.tiny import save_tiny_sam


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPCR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_file_is_hashed_once_per_version(cache, tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    first = file_sha256(f)
    assert first == sha256_uncached(f) and (cache / hashing.CACHE_NAME).is_file()
    monkeypatch.setattr(hashing, "sha256_uncached", lambda p: pytest.fail("re-read a file whose hash is cached"))
    assert file_sha256(f) == first
    monkeypatch.undo()
    monkeypatch.setenv("PPCR_CACHE_DIR", str(cache))
    f.write_bytes(b"b" * 1000)  # same size, new content: its version changed, so it is read again
    assert file_sha256(f) == sha256_uncached(f) != first


def copied_base(tiny_models, tmp_path):
    """Copies of the tiny Qwen and SAM that a test may change."""
    mllm_dir = shutil.copytree(tiny_models["qwen2_5_vl"], tmp_path / "base" / "mllm")
    sam = shutil.copy(tiny_models["sam"], tmp_path / "base" / "sam.pth")
    return Path(mllm_dir), Path(sam)


def test_a_changed_base_file_is_named_with_both_hashes_and_the_flag(tiny_shards, tiny_models, tmp_path, cache):
    mllm_dir, sam = copied_base(tiny_models, tmp_path)
    m = model_config(tiny_shards, {**tiny_models, "qwen2_5_vl": mllm_dir, "sam": sam}, "qwen2_5_vl").model
    saved = base_fingerprint(m)
    assert set(saved["mllm"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert check_base(saved, m, what="checkpoint X", allow=False) == saved
    was = saved["sam"]["sha256"]
    save_tiny_sam(m.sam_arch, 256, sam, seed=1)  # another SAM at the same path
    (mllm_dir / "generation_config.json").unlink()
    now = sha256_uncached(sam)
    with pytest.raises(BaseMismatch) as e:
        check_base(saved, m, what="checkpoint X", allow=False)
    msg = str(e.value)
    assert f"{sam}: sha256 {was} when trained, {now} now" in msg
    assert (
        f"{mllm_dir / 'generation_config.json'}: sha256 {saved['mllm']['files']['generation_config.json']} "
        "when trained, (no such file) now" in msg
    )
    assert "checkpoint X was trained on other base weights" in msg and "--allow-base-mismatch" in msg
    with pytest.warns(UserWarning, match="loaded anyway as asked"):
        assert check_base(saved, m, what="checkpoint X", allow=True)["sam"]["sha256"] == now
    with pytest.warns(UnverifiedBaseWarning, match="records no fingerprint"):
        assert check_base(None, m, what="checkpoint X", allow=False) is None


def test_a_resume_with_other_model_settings_is_refused_by_key(tiny_shards, tiny_models):
    saved = model_config(tiny_shards, tiny_models, "qwen2_5_vl")
    fine = replace(saved, model=replace(saved.model, max_new_tokens=9, mllm_path="/elsewhere"))
    check_model_settings(saved, fine, what="checkpoint X", allow=False)  # decoding and where the base lives
    other = model_config(tiny_shards, tiny_models, "qwen2_5_vl", "model.lora.rank=4", "model.box_head=mlp")
    with pytest.raises(BaseMismatch) as e:
        check_model_settings(saved, other, what="checkpoint X", allow=False)
    assert "model.lora.rank: 8 when saved, 4 now" in str(e.value) and "model.box_head: 'pointer'" in str(e.value)
    assert "--allow-model-change" in str(e.value)
    with pytest.warns(UserWarning, match="resumed anyway as asked"):
        check_model_settings(saved, other, what="checkpoint X", allow=True)


def test_a_hub_id_records_its_commit_and_later_loads_ask_for_it(tiny_shards, tiny_models, tmp_path, monkeypatch, cache):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / commit
    shutil.copytree(tiny_models["qwen2_5_vl"], snapshot)
    asked = []

    def fake_snapshot(repo_id, *, revision=None, **kwargs):  # the hub cache, answered locally
        asked.append(revision)
        return str(snapshot)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(mllm, "snapshot_download", fake_snapshot)
    m = model_config(tiny_shards, tiny_models, "qwen2_5_vl", "model.mllm_path=someorg/tiny").model
    fp = base_fingerprint(m)
    assert fp["mllm"]["hub_id"] == "someorg/tiny" and fp["mllm"]["revision"] == commit
    pinned = pin_revision(m, fp)
    assert pinned.mllm_revision == commit and pin_revision(replace(m, mllm_path="other/x"), fp).mllm_revision is None
    mllm.load_mllm(pinned.mllm_path, revision=pinned.mllm_revision)
    assert asked == [None, commit]  # the first run took the newest; its later loads ask for that commit
    moved = dict(fp, mllm=dict(fp["mllm"], revision="f" * 40))
    with pytest.raises(BaseMismatch, match=f"someorg/tiny: hub commit {'f' * 40} when trained, {commit} now"):
        check_base(moved, pinned, what="checkpoint X", allow=False)


def test_checkpoints_record_their_base_and_config_and_evaluation_checks_them(trained_run, tiny_models, tmp_path, cache):
    """The run's checkpoint carries ppcr_base.json and its own config; a copy of the run whose SAM file was
    replaced is refused by load_checkpoint; without a fingerprint (an older checkpoint) it loads, warned."""
    ckpt = trained_run / "checkpoints/step_00000003"
    saved = json.loads((ckpt / FINGERPRINT_FILE).read_text())
    assert saved["sam"]["sha256"] == sha256_uncached(tiny_models["sam"])
    weights = tiny_models["qwen2_5_vl"] / "model.safetensors"
    assert saved["mllm"]["files"]["model.safetensors"] == sha256_uncached(weights)
    assert load_config(ckpt / CONFIG_FILE).train.run_name == "trained"

    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    sam = shutil.copy(tiny_models["sam"], tmp_path / "sam.pth")
    for f in (run / "config.yaml", run / "checkpoints/step_00000003" / CONFIG_FILE):
        cfg = yaml.safe_load(f.read_text())
        cfg["model"]["sam_checkpoint"] = str(sam)
        f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    load_checkpoint(run)  # the same bytes elsewhere: fine
    save_tiny_sam(load_config(run / "config.yaml").model.sam_arch, 256, sam, seed=1)
    with pytest.raises(BaseMismatch, match=f"{sam}: sha256 {saved['sam']['sha256']} when trained"):
        load_checkpoint(run)
    (run / "checkpoints/step_00000003" / FINGERPRINT_FILE).unlink()
    (run / "checkpoints/step_00000003" / CONFIG_FILE).unlink()
    with pytest.warns(UnverifiedBaseWarning, match="step_00000003 records no fingerprint"):
        assert load_checkpoint(run)[3] == "step_00000003"


def test_an_export_checks_its_own_files(exported, tmp_path, cache):
    copy = shutil.copytree(exported / "model", tmp_path / "model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained(copy)
    assert not [w for w in caught if "base weights" in str(w.message)]  # its fingerprint fits: not a word
    heads_of_sam = copy / "sam.safetensors"
    data = bytearray(heads_of_sam.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    heads_of_sam.write_bytes(bytes(data))
    with pytest.raises(BaseMismatch, match=f"export {copy} was trained on other base weights"):
        load_pretrained(copy)
    assert load_pretrained(copy, allow_base_mismatch=True)[0] is not None
