"""Requests that never crash the server or the batch (issue 22, part 6): degenerate sizes, corrupt and
truncated files, huge images and odd ids each get a message for that request while the rest goes on;
ppcr-infer streams its requests; the demo decodes uploads itself; the end of sequence ends a row."""

import json

import numpy as np
import pytest
import torch
from conftest import model_config
from PIL import Image

from ppcr.data.images import ImageError, load_image
from ppcr.eval import infer
from ppcr.eval.demo import DemoInputError, RequestHandler, build_app, examples
from ppcr.eval.segmenter import Segmenter
from ppcr.model.generation import greedy_stage
from ppcr.model.model import PPCRModel


def test_degenerate_shapes_are_refused_before_the_model_sees_them(tmp_path):
    Image.new("RGB", (8000, 1)).save(tmp_path / "strip.png")  # passed the size check, then broke SAM's resize
    with pytest.raises(ImageError, match=r"strip.png is 8000 x 1 px, one side 8000 times the other; images up to 20:1"):
        load_image(tmp_path / "strip.png")
    with pytest.raises(ImageError, match=r"is 3 x 200 px, one side 67 times the other"):
        load_image(np.zeros((200, 3, 3), np.uint8))
    with pytest.raises(ImageError, match=r"shape \(0, 5, 3\)"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    assert load_image(np.zeros((10, 200, 3), np.uint8)).pixels.shape == (10, 200, 3)  # 20:1 is taken


@pytest.fixture(scope="module")
def segmenter(exported):
    return Segmenter.from_pretrained(exported / "model", device="cpu", batch_size=1)


def bad_files(tmp_path):
    """A truncated JPEG, a strip, a huge image: what a user's folder holds."""
    image, _ = examples()[0]
    data = open(image, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (1, 8000)).save(tmp_path / "strip.png")
    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")
    return tmp_path / "truncated.jpg", tmp_path / "strip.png", tmp_path / "huge.png"


def test_infer_answers_each_bad_request_with_its_line_streams_and_goes_on(exported, tmp_path, capsys, monkeypatch):
    image, expression = examples()[0]
    truncated, strip, huge = bad_files(tmp_path)
    reqs = [
        {"image": image, "expression": expression, "id": "first"},
        {"image": str(truncated), "expression": "x"},
        {"image": str(strip), "expression": "x"},
        {"image": str(huge), "expression": "x"},
        {"image": image, "expression": "x", "id": "../outside"},
        {"image": image, "expression": "x", "id": "first"},
        {"image": image, "expression": "boom", "id": "fails_in_the_model"},
        {"image": image, "expression": expression, "id": "last"},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    events = []
    loaded, called = infer.load_image, Segmenter.__call__

    def spy_load(source):
        events.append("load")
        return loaded(source)

    def model_fault(self, images, expressions):  # one request that fails inside the model, e.g. out of memory
        events.append("segment")
        if "boom" in expressions:
            raise RuntimeError("CUDA out of memory (simulated)")
        return called(self, images, expressions)

    monkeypatch.setattr(infer, "load_image", spy_load)
    monkeypatch.setattr(Segmenter, "__call__", model_fault)
    out = tmp_path / "out"
    code = infer.main(
        [
            "--checkpoint",
            str(exported / "model"),
            "--jsonl",
            str(requests),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"{requests}:2: cannot read image {truncated}" in err
    assert f"{requests}:3: {strip} is 1 x 8000 px, one side 8000 times the other" in err
    assert f"{requests}:4: {huge} is 9000 x 8000 px (72 MP)" in err
    assert f"{requests}:5: id '../outside' cannot be a file name" in err
    assert f"{requests}:6: id 'first' is taken by {requests}:1" in err
    assert f"{requests}:7: could not segment it (RuntimeError: CUDA out of memory (simulated))" in err
    assert sorted(p.name for p in out.iterdir()) == [
        f"{n}.{k}" for n in ("first", "last") for k in ("json", "mask.png", "overlay.png")
    ]
    assert not (tmp_path / "outside.json").exists()
    assert events.index("segment") < len(events) - 1 - events[::-1].index("load")  # a batch before the last read


def test_the_demo_answers_a_strip_and_a_model_failure_in_the_page(segmenter, tmp_path, monkeypatch):
    handler = RequestHandler(segmenter)
    _, strip, _ = bad_files(tmp_path)
    with pytest.raises(DemoInputError, match="1 x 8000 px, one side 8000 times the other"):
        handler(str(strip), "the thing")
    image, _ = examples()[0]
    monkeypatch.setattr(Segmenter, "__call__", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(DemoInputError, match=r"could not be segmented \(RuntimeError: out of memory\)"):
        handler(image, "the thing")


def test_a_corrupt_upload_reaches_ppcrs_decoding_and_its_message_the_page(segmenter, tmp_path):
    """Through the running app's own API, as the page calls it: the upload is not opened by Gradio (which used to
    fail there with a bare "Error"); ppcr's decoding answers it, and a good upload after it is answered."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from ppcr.common.distributed import free_port

    truncated, _, _ = bad_files(tmp_path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    app = build_app(RequestHandler(segmenter), title="test")
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for path, message in ((corrupt, "cannot read image"), (truncated, "cannot read image")):
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(path)), "the thing", api_name="/segment")
        image, expression = examples()[0]
        _, semantic, spatial, details = client.predict(handle_file(image), expression, api_name="/segment")
        assert "**mask**" in details and isinstance(semantic, str)
    finally:
        app.close()


def test_the_end_of_sequence_ends_a_row(tiny_shards, tiny_models, monkeypatch):
    """A model that answers with the end of sequence (before its [SEM]) has answered: its row stops there, and a
    batch of such rows runs no more forwards."""
    cfg = model_config(tiny_shards, tiny_models, "qwen2_5_vl", "model.max_new_tokens=12")
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    eos = model.tokenizer.eos_token_id
    assert eos is not None and eos != model.ids.sem

    def eos_logits(hidden):
        out = torch.zeros(hidden.shape[0], model.mllm.get_input_embeddings().num_embeddings + 8)
        out[:, eos] = 1.0
        return out

    monkeypatch.setattr(model.token_rows, "logits", eos_logits)
    image = torch.zeros(3, 112, 112, dtype=torch.uint8)
    stage, vision = model.encode(["where is it?", "and here?"], None, [image, image])
    with torch.no_grad():
        features = model.vision_features(vision)
        decoded = greedy_stage(
            model, stage, features, None, marker=model.ids.sem, stops=(model.ids.sem,), max_new_tokens=12
        )
    assert decoded.ids == [[eos], [eos]] and decoded.forwards == 1 and decoded.found == [False, False]
