"""``model.mllm_path`` as a hub id: refused with advice while the hub is offline (the default),
downloaded and loaded when the user opts in with ``HF_HUB_OFFLINE=0``; missing checkpoints say what
to download."""

import os
import subprocess
import sys

import pytest
from huggingface_hub import constants

from ppcr.config import ConfigError, ModelConfig, load_config
from ppcr.model import mllm
from ppcr.model.mllm import check_mllm_path, load_mllm, looks_like_hub_id
from ppcr.model.sam import load_sam

HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local directory named like a hub org
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize(
    "path,is_id",
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", True),
        ("llava-hf/llava-1.5-7b-hf", True),
        ("./Qwen/Qwen2.5-VL-7B-Instruct", False),
        ("/models/qwen", False),
        ("~/qwen/x", False),
        ("checkpoints/a/b", False),
        ("qwen", False),
        ("org/na me", False),
        ("org/name--x", False),
    ],
)
def test_what_reads_as_a_hub_id(path, is_id, offline):
    assert looks_like_hub_id(path) is is_id


def test_a_path_under_an_existing_directory_is_a_missing_path_not_a_hub_id(online, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"no MLLM checkpoint at checkpoints/tiny-x \(config.json missing\)"
        r".*hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir checkpoints/tiny-x",
    ):
        check_mllm_path("checkpoints/tiny-x")


def test_offline_hub_id_says_how_to_download_or_opt_in(offline, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("the hub was asked while offline")

    monkeypatch.setattr(mllm, "snapshot_download", no_download)
    with pytest.raises(FileNotFoundError) as e:
        load_mllm(HUB_ID)
    msg = str(e.value)
    assert "reads as a hub id, but the hub is offline" in msg
    assert f"hf download {HUB_ID} --local-dir checkpoints/Qwen2.5-VL-7B-Instruct" in msg and "HF_HUB_OFFLINE=0" in msg


def test_online_hub_id_loads_from_the_downloaded_snapshot(online, monkeypatch, tiny_models):
    asked = []

    def fake_snapshot(repo_id, **kwargs):  # the hub's download, answered with a local tiny model
        asked.append((repo_id, kwargs))
        return str(tiny_models["qwen2_5_vl"])

    monkeypatch.setattr(mllm, "snapshot_download", fake_snapshot)
    assert check_mllm_path("someorg/tiny-qwen") == "someorg/tiny-qwen"
    model, processor = load_mllm("someorg/tiny-qwen")
    assert model.config.model_type == "qwen2_5_vl" and processor is not None
    assert [a[0] for a in asked] == ["someorg/tiny-qwen"] and "*.bin" in asked[0][1]["ignore_patterns"]


def _load_in_subprocess(tmp_path, **env):
    """load_mllm(HUB_ID) in a fresh process (the hub reads HF_HUB_OFFLINE at import), with an endpoint
    that refuses connections so that nothing is ever downloaded; returns its last output line."""
    code = (
        "from ppcr.model.mllm import load_mllm\n"
        "try:\n"
        f"    load_mllm({HUB_ID!r})\n"
        "except FileNotFoundError as e:\n"
        "    c = e.__cause__\n"
        "    print(repr(str(e)), type(c).__module__ if c else None, type(c).__name__ if c else None)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={
            **base,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "OMP_NUM_THREADS": "1",
            **env,
        },
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_hf_hub_offline_0_is_the_opt_in_that_reaches_the_hub(tmp_path):
    """With HF_HUB_OFFLINE=0 a hub id goes to the hub (here: a refused connection, reported as a failed
    download caused by huggingface_hub); without it, ppcr's offline advice, and the hub is not asked."""
    line = _load_in_subprocess(tmp_path, HF_HUB_OFFLINE="0")
    assert f"could not download hub model {HUB_ID}" in line and " huggingface_hub." in line, line
    assert "Connection refused" in line  # it did connect to the endpoint: not offline, not cache-only
    assert "OfflineModeIsEnabled" not in line
    line = _load_in_subprocess(tmp_path)
    assert "reads as a hub id, but the hub is offline" in line and line.endswith("None None"), line


@pytest.mark.parametrize("value", ["", "  ", "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct"])
def test_config_refuses_an_empty_or_url_mllm_path(value):
    with pytest.raises(ConfigError, match=r"config key 'model.mllm_path': .*hub id 'org/name' \(not a URL\)"):
        load_config(None, [f"model.mllm_path='{value}'"])


def test_missing_real_sam_checkpoint_names_the_file_and_its_md5(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth "
        r"\(md5 0b3195507c641ddb6910d2bb5adee89c",
    ):
        load_sam(ModelConfig(sam_checkpoint=str(tmp_path / "nope.pth"), sam_type="vit_l", sam_image_size=1024))
