"""Untrusted files: weights load as safetensors or with torch.load(weights_only=True), shards hold no
pickles and are never unpickled, the REFER pickle is read without running code, and nothing reaches
the network (the hub is offline by default). Each malicious file here would create ``marker``."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Payload

from ppcr.config import load_config
from ppcr.data.refer import read_refer
from ppcr.data.shards import SAMPLE_FIELDS, iter_tar_samples, load_manifest
from ppcr.model.mllm import load_mllm
from ppcr.model.sam import load_sam

ROOT = Path(__file__).parent.parent.parent


def test_a_refer_pickle_that_would_run_code_is_refused(handmade, tmp_path):
    root, img_dir = handmade
    refs = root / "refcoco" / "refs(unc).p"
    good = pickle.loads(refs.read_bytes())
    marker = tmp_path / "pwned"
    refs.write_bytes(pickle.dumps(good + [{"ref_id": 99, "sentences": Payload(marker)}]))
    with pytest.raises(ValueError, match=r"refs\(unc\).p: not a plain REFER refs pickle: it names posix.mkdir"):
        read_refer(root, "refcoco", "unc", img_dir)
    assert not marker.exists()


def test_a_sam_checkpoint_that_would_run_code_is_refused(tiny_models, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_models["sam"], weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, tmp_path / "sam.pth")
    cfg = load_config(None, [f"model.sam_checkpoint={tmp_path / 'sam.pth'}"]).model
    with pytest.raises(ValueError, match="holds more than weights, so it is not loaded"):
        load_sam(cfg)
    assert not marker.exists()


def test_an_mllm_with_pickled_weights_is_refused(tiny_models, tmp_path):
    model_dir = tmp_path / "mllm"
    shutil.copytree(tiny_models["llava"], model_dir)
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"lm_head.weight": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_mllm(model_dir)
    assert not marker.exists()


def test_shards_hold_only_images_masks_and_json(tiny_shards):
    members = set()
    for split in load_manifest(tiny_shards)["splits"].values():
        for shard in split["shards"]:
            for sample in iter_tar_samples(tiny_shards / shard["name"]):
                members |= set(sample) - {"__key__"}
    assert members == set(SAMPLE_FIELDS)


OFFLINE_PROBE = r"""
import socket, sys
attempts = []
def connect(self, address):
    attempts.append(address)
    raise OSError("network blocked by the test")
socket.socket.connect = connect
def getaddrinfo(host, *args, **kwargs):
    attempts.append(host)
    raise OSError("name resolution blocked by the test")
socket.getaddrinfo = getaddrinfo
import transformers  # imported before ppcr, as launch/train.py does
import ppcr
from huggingface_hub import constants
try:
    transformers.AutoConfig.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    outcome = "loaded"
except OSError as e:
    outcome = type(e).__name__
print("PROBE", constants.HF_HUB_OFFLINE, outcome, len(attempts))
"""


def test_nothing_reaches_the_network_by_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: a hub name could only be fetched
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("PROBE"))
    assert line == "PROBE True OSError 0", out.stderr[-2000:]  # refused offline, no connection tried
